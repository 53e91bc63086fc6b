//! One task per client: it reads and answers requests (rate limit, subscription cap,
//! authentication), pings the client, closes it when it goes silent, and writes out what its
//! [`Outbox`] had to queue while the socket was full. Deliveries to a client that keeps up do
//! not involve this task at all: the fan-out writes them (README § Performance).
//!
//! [`Outbox`]: crate::ws::Outbox

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::app::{AppState, ConnGuard};
use crate::auth::{AuthError, Identity};
use crate::domain::Channel;
use crate::hub::{Attached, Client, Close, Held, Join, TopicKey};
use crate::protocol::{
    close, msg, now_millis, parse_request, ErrorCode, Frame, Request, RequestError, RequestId,
    SubEntry, SubOptions,
};
use crate::ws::{self, Incoming, Wire};

/// How long the last words and the close frame may take on a stuck socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Rate-limit violations tolerated (refilled one a second) before the client is closed 1008.
const ABUSE_BURST: u32 = 20;

/// Runs a client from upgrade to close. `prefix` is what the client sent right after its
/// upgrade request; `at_connect` the result of verifying a token sent with that request, if any.
pub async fn run(
    socket: Arc<crate::ws::Socket>,
    prefix: Bytes,
    deflate: Option<crate::ws::deflate::Negotiated>,
    state: AppState,
    at_connect: Option<Result<Identity, AuthError>>,
    guard: ConnGuard,
) {
    let _guard = guard;
    let _task = state.clients.token();
    let hub = &state.hub;
    let client =
        hub.register_client_with(Some(socket.clone()), deflate.map(|d| d.server_window_bits));
    let mut incoming = ws::incoming(
        socket,
        prefix,
        client.clone(),
        state.config.server.max_message_bytes,
        deflate,
    )
    .await;
    let cfg = &state.config.server;

    let mut session = Session::new(state.clone(), client.clone());
    let admitted = match at_connect {
        Some(Ok(identity)) => session.claim(identity, &None).await,
        Some(Err(AuthError::KeysUnavailable(why))) => {
            // Not the client's fault: it stays, for public channels, and may send `auth` later.
            session.refused(&AuthError::KeysUnavailable(why.clone()), None);
            session.send(msg::error(None, ErrorCode::InvalidToken, &why, &None));
            session.keys_unavailable = Some(why);
            true
        }
        Some(Err(e)) => {
            // PROTOCOL.md: a bad token at connect gets an error, then close 1008.
            session.refused(&e, None);
            let code = auth_code(&e);
            state.stats.client_error(code);
            session.send(msg::error(None, code, &e.to_string(), &None));
            client.outbox.close(Close {
                code: close::POLICY,
                reason: "invalid token".into(),
                last_words: None,
                abort: false,
            });
            false
        }
        None => true,
    };
    if admitted {
        let user = session.identity.as_ref().map(|i| i.user.as_str());
        session.send(msg::connected(
            &client.name,
            user,
            cfg.max_subscriptions_per_client,
        ));
    }
    state
        .stats
        .client_connected(&client.name, session.identity.is_some());

    let close = session.serve(&mut incoming).await;
    // Out of the hub first: no more fan-out to it, and it no longer counts as connected while
    // the closing handshake takes its time.
    hub.unregister_client(&client);
    if let Some(close) = close {
        finish(&mut incoming, &client, close).await;
    }
    tracing::debug!(client = %client.name, "client disconnected");
}

fn auth_code(e: &AuthError) -> ErrorCode {
    match e {
        AuthError::Expired => ErrorCode::TokenExpired,
        AuthError::Invalid(_) | AuthError::KeysUnavailable(_) => ErrorCode::InvalidToken,
    }
}

/// What the rate limit decided for one request.
enum Admit {
    /// Within the limit: carry it out.
    Yes,
    /// Over the limit: answered with `RATE_LIMITED` and not carried out.
    Refused,
    /// Over the limit for too long: the client is being closed with 1008.
    Close,
}

struct Session {
    state: AppState,
    client: Arc<Client>,
    identity: Option<Identity>,
    /// The connection's place in its user's count (`server.max_connections_per_user`).
    slot: Option<crate::app::UserSlot>,
    /// Why the last token could not be checked, while the JWKS is unavailable: said again to
    /// a private subscription.
    keys_unavailable: Option<String>,
    /// When `identity`'s token expires; kept beside it so the loop reads no clock for it.
    expires: Option<Instant>,
    limiter: DefaultDirectRateLimiter,
    /// Refused requests allowed before the client counts as abusive (sustained flooding).
    abuse: DefaultDirectRateLimiter,
    /// Error replies allowed before the client counts as broken or hostile.
    errors: DefaultDirectRateLimiter,
}

impl Session {
    fn new(state: AppState, client: Arc<Client>) -> Session {
        let cfg = &state.config.server;
        let per_second = NonZeroU32::new(cfg.client_requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.client_request_burst).unwrap_or(NonZeroU32::MIN);
        let abuse_burst = NonZeroU32::new(ABUSE_BURST).unwrap_or(NonZeroU32::MIN);
        let error_budget = NonZeroU32::new(cfg.client_error_budget).unwrap_or(NonZeroU32::MIN);
        Session {
            errors: RateLimiter::direct(
                Quota::per_second(NonZeroU32::MIN).allow_burst(error_budget),
            ),
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            abuse: RateLimiter::direct(Quota::per_second(NonZeroU32::MIN).allow_burst(abuse_burst)),
            state,
            client,
            identity: None,
            slot: None,
            keys_unavailable: None,
            expires: None,
        }
    }

    fn send(&self, frame: Frame) {
        if self.client.outbox.push_control(frame) == crate::ws::Pushed::Queued {
            self.state.stats.control_out(1);
        }
    }

    /// Answers a request with an error, within the connection's error budget: past it the
    /// client is closed with 1008, after what is queued.
    fn error(&self, channel: Option<&str>, code: ErrorCode, message: &str, id: &RequestId) {
        if self.client.outbox.is_closing() {
            return;
        }
        self.state.stats.client_error(code);
        if self.errors.check().is_err() {
            tracing::info!(client = %self.client.name, "client spent its error budget; closing with 1008");
            let last_words = msg::error(
                None,
                code,
                "too many invalid requests; closing the connection",
                id,
            );
            self.client.outbox.close(Close {
                code: close::POLICY,
                reason: "too many invalid requests".into(),
                last_words: Some(last_words),
                abort: false,
            });
            return;
        }
        self.send(msg::error(channel, code, message, id));
    }

    /// Counts a refusal of `e` (with the user, where known).
    fn refused(&self, e: &AuthError, user: Option<&str>) {
        self.state
            .stats
            .auth_refused(e.reason(), Some(&self.client.name), user);
    }

    /// Takes `identity` as who the client is, if its user may hold one more connection
    /// (`server.max_connections_per_user`); otherwise answers `TOO_MANY_CONNECTIONS` and closes
    /// the connection with 1008. Returns whether the client stays.
    async fn claim(&mut self, identity: Identity, id: &RequestId) -> bool {
        let same_user = self
            .slot
            .as_ref()
            .is_some_and(|s| s.user() == &identity.user);
        if !same_user {
            // Boxed: the cluster's Redis call is a large future, and every session's task would
            // otherwise be allocated at its size for the life of the connection.
            match Box::pin(self.state.users.acquire(&identity.user)).await {
                Ok(slot) => self.slot = slot,
                Err(limit) => {
                    self.state.stats.auth_refused(
                        "user_limit",
                        Some(&self.client.name),
                        Some(identity.user.as_str()),
                    );
                    self.state.stats.client_error(ErrorCode::TooManyConnections);
                    let last_words = msg::error(
                        None,
                        ErrorCode::TooManyConnections,
                        &format!(
                            "user {} already holds {} connections, the most one user may hold; close one first",
                            identity.user, limit.limit
                        ),
                        id,
                    );
                    self.client.outbox.close(Close {
                        code: close::POLICY,
                        reason: "too many connections for this user".into(),
                        last_words: Some(last_words),
                        abort: false,
                    });
                    return false;
                }
            }
        }
        self.keys_unavailable = None;
        self.set_identity(Some(identity));
        true
    }

    /// Sets (or clears) who the client is, and when that stops being true.
    fn set_identity(&mut self, identity: Option<Identity>) {
        if identity.is_none() {
            self.slot = None;
        }
        // One past the last accepted millisecond (`Identity::expired`).
        self.expires = identity
            .as_ref()
            .and_then(|i| i.valid_until_ms)
            .map(|until| {
                let left_ms = (until + 1 - now_millis()).max(0) as u64;
                Instant::now() + Duration::from_millis(left_ms)
            });
        self.identity = identity;
    }

    /// The client's life: deliver, read, ping, until it leaves (`None`) or the relay decides to
    /// close it (the close to perform).
    async fn serve(&mut self, ws: &mut Incoming) -> Option<Close> {
        let cfg = self.state.config.server.clone();
        let idle = Duration::from_millis(cfg.client_timeout_ms);
        let ping_every = Duration::from_millis(cfg.ping_interval_ms);
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + ping_every;
        // Off once the client is being closed: what it sends then is not read.
        let mut reading = true;
        let mut shutting_down = false;
        let mut shutdown = std::pin::pin!(self.state.shutdown.clone().cancelled_owned());
        // One timer per client, aimed at whichever comes first: ping, silence, token expiry.
        let timer = tokio::time::sleep_until(next_ping);
        tokio::pin!(timer);
        loop {
            let expiry = self.expires;
            let wake = [Some(next_ping), Some(last_heard + idle), expiry]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(next_ping);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                biased;
                close = self.client.outbox.deliver() => return Some(close),
                frame = ws.next(), if reading => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            self.state.stats.message_in();
                            // Parsed before the rate limit so that a refusal can echo the id;
                            // parsing is cheap next to what a request does.
                            let parsed = parse_request(text.as_str());
                            let id = match &parsed {
                                Ok((id, _)) => id,
                                Err(e) => &e.id,
                            };
                            match self.admit(id) {
                                Admit::Yes => self.handle(parsed).await,
                                Admit::Refused => {}
                                Admit::Close => reading = false,
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.state.stats.message_in();
                            match self.admit(&None) {
                                Admit::Yes => self.error(None, ErrorCode::InvalidJson, "binary frames are not supported; send JSON text", &None),
                                Admit::Refused => {}
                                Admit::Close => reading = false,
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            self.client.outbox.close(ws::echo(frame));
                            reading = false;
                        }
                        None => return None,
                        Some(Ok(_)) => {} // ping/pong: liveness only
                        Some(Err(e)) => {
                            let Some((code, reason)) = ws::protocol_close(&e) else {
                                return None; // the connection itself failed
                            };
                            if code == close::TOO_BIG {
                                self.error(None, ErrorCode::InvalidJson, &format!("message too large: the limit is {} bytes", cfg.max_message_bytes), &None);
                            }
                            self.client.outbox.close(Close { code, reason: reason.into(), last_words: None, abort: false });
                            // What follows a broken frame cannot be trusted: stop reading.
                            reading = false;
                        }
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= last_heard + idle {
                        tracing::info!(client = %self.client.name, "client silent past client_timeout_ms; closing");
                        self.client.outbox.close(Close { code: close::POLICY, reason: "no traffic or pong within the timeout".into(), last_words: None, abort: true });
                        reading = false;
                        // Push the wake-up past the deadline; the outbox branch closes next.
                        last_heard = now;
                    }
                    if expiry.is_some_and(|e| now >= e) {
                        self.token_expired();
                    }
                    if now >= next_ping {
                        next_ping = now + ping_every;
                        self.client.outbox.push_wire(Wire::ping());
                    }
                }
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    reading = false;
                    self.client.outbox.close(Close { code: close::GOING_AWAY, reason: "server shutting down".into(), last_words: None, abort: false });
                }
            }
        }
    }

    /// Applies the request rate limit to a request with `id`. A refused request is not carried
    /// out: its only answer is the `RATE_LIMITED` error, echoing its id.
    fn admit(&mut self, id: &RequestId) -> Admit {
        if self.limiter.check().is_ok() {
            return Admit::Yes;
        }
        self.state.stats.rate_limited();
        if self.abuse.check().is_ok() {
            let cfg = &self.state.config.server;
            self.error(
                None,
                ErrorCode::RateLimited,
                &format!(
                    "too many requests: at most {} a second (bursts of {}); this request was not carried out, send it again later",
                    cfg.client_requests_per_second, cfg.client_request_burst
                ),
                id,
            );
            return Admit::Refused;
        }
        tracing::info!(client = %self.client.name, "client kept flooding; closing with 1008");
        let last_words = msg::error(
            None,
            ErrorCode::RateLimited,
            "too many requests for too long; closing the connection",
            id,
        );
        self.client.outbox.close(Close {
            code: close::POLICY,
            reason: "request rate exceeded".into(),
            last_words: Some(last_words),
            abort: false,
        });
        Admit::Close
    }

    async fn handle(&mut self, parsed: Result<(RequestId, Request), RequestError>) {
        let (id, request) = match parsed {
            Ok(r) => r,
            Err(e) => return self.error(None, e.code, &e.message, &e.id),
        };
        match request {
            Request::Subscribe(entries) => {
                for entry in entries {
                    self.subscribe(&entry, &id).await;
                }
            }
            Request::Unsubscribe(names) => {
                for name in names {
                    self.unsubscribe(&name, &id);
                }
            }
            Request::Ping => self.send(msg::pong(&id)),
            Request::List => {
                let names: Vec<String> = self
                    .client
                    .subscriptions()
                    .iter()
                    .map(|h| h.name.to_string())
                    .collect();
                self.send(msg::subscriptions(&names, &id));
            }
            Request::Auth(token) => self.authenticate(&token, &id).await,
        }
    }

    async fn subscribe(&mut self, entry: &SubEntry, id: &RequestId) {
        let name = entry.name.as_str();
        let channel: Channel = match name.parse() {
            Ok(c) => c,
            Err(e) => {
                let code = match e {
                    crate::domain::ChannelError::Invalid(_) => ErrorCode::InvalidChannel,
                    crate::domain::ChannelError::UnknownExchange(_) => ErrorCode::UnknownExchange,
                };
                return self.error(Some(name), code, &e.to_string(), id);
            }
        };
        let options = match entry
            .options
            .clone()
            .and_then(|o| options_apply(&channel, o))
        {
            Ok(o) => o,
            Err(message) => return self.error(Some(name), ErrorCode::InvalidOption, &message, id),
        };
        let max = self.state.config.server.max_subscriptions_per_client;
        if !self.client.holds(&channel) && self.client.subscription_count() >= max {
            return self.error(
                Some(name),
                ErrorCode::SubscriptionLimit,
                &format!(
                    "a client may hold at most {max} subscriptions; unsubscribe from one first"
                ),
                id,
            );
        }
        if let Some(user) = channel.private_user() {
            // Fixed order: token present, token still valid, token bound to this user.
            let refusal = match &self.identity {
                None => Some((ErrorCode::AuthRequired, match &self.keys_unavailable {
                    Some(why) => format!("Authentication required for this channel; your token could not be checked: {why}"),
                    None => "Authentication required for this channel".to_string(),
                })),
                Some(i) if i.expired(now_millis()) => Some((
                    ErrorCode::TokenExpired,
                    "your token has expired; send {\"type\":\"auth\",\"token\":...} with a fresh one".to_string(),
                )),
                Some(i) if &i.user != user => Some((
                    ErrorCode::Forbidden,
                    format!("channel {name} belongs to another user"),
                )),
                Some(_) => None,
            };
            if let Some((code, message)) = refusal {
                let reason = match code {
                    ErrorCode::AuthRequired if self.keys_unavailable.is_some() => {
                        "keys_unavailable"
                    }
                    ErrorCode::AuthRequired => "auth_required",
                    ErrorCode::TokenExpired => "token_expired",
                    _ => "forbidden",
                };
                let who = self.identity.as_ref().map(|i| i.user.to_string());
                self.state
                    .stats
                    .auth_refused(reason, Some(&self.client.name), who.as_deref());
                return self.error(Some(name), code, &message, id);
            }
        }
        let held = Held {
            name: Arc::from(channel.to_string()),
            topic: self.state.hub.topic_for(&channel),
            channel,
            throttle: options.throttle_ms.map(Duration::from_millis),
        };
        // In a cluster, the topic's shared sequence (and, for `since`, what the cluster keeps
        // after it) comes first: one Redis round trip for a topic new to this node.
        let prepared = self
            .state
            .hub
            .prepare(&held.topic, options.since.as_ref())
            .await;
        let join = Join {
            history: options.history.map(|n| n as usize),
            since: options.since,
            replace: entry.object,
            prepared,
        };
        let exchange = match &held.topic {
            TopicKey::Feed(key) => key.exchange.to_string(),
            TopicKey::Published(_) => "the exchange".to_string(),
        };
        match self.state.hub.attach(&self.client, held, join, id) {
            Attached::Live => {}
            Attached::Unavailable => {
                self.error(
                    Some(name),
                    ErrorCode::UpstreamUnavailable,
                    &format!("{exchange} is unreachable right now; the subscription stays and data flows once it is back"),
                    id,
                );
            }
            Attached::Refused(code, message) => self.error(Some(name), code, &message, id),
        }
    }

    fn unsubscribe(&mut self, name: &str, id: &RequestId) {
        let held = name.parse::<Channel>().ok().and_then(|c| {
            self.client
                .subscriptions()
                .into_iter()
                .find(|h| h.channel == c)
        });
        match held {
            Some(held) if self.state.hub.detach(&self.client, &held) => {
                self.send(msg::unsubscribed(&held.name, id))
            }
            _ => self.error(
                Some(name),
                ErrorCode::NotSubscribed,
                &format!("you are not subscribed to {name}; send {{\"type\":\"list\"}} to see your subscriptions"),
                id,
            ),
        }
    }

    async fn authenticate(&mut self, token: &str, id: &RequestId) {
        // Boxed for the same reason (a JWKS fetch may run inside it).
        match Box::pin(self.state.auth.verify(token)).await {
            Ok(identity) => {
                // A token for another user ends the old user's private subscriptions.
                if let Some(old) = &self.identity {
                    if old.user != identity.user {
                        self.drop_private(|_| true, None);
                    }
                }
                let (user, expires_at) = (identity.user.clone(), identity.expires_at);
                if self.claim(identity, id).await {
                    self.send(msg::authenticated(user.as_str(), expires_at, id));
                }
            }
            Err(e) => {
                let user = self.identity.as_ref().map(|i| i.user.to_string());
                self.refused(&e, user.as_deref());
                if let AuthError::KeysUnavailable(why) = &e {
                    self.keys_unavailable = Some(why.clone());
                }
                self.error(None, auth_code(&e), &e.to_string(), id)
            }
        }
    }

    fn token_expired(&mut self) {
        tracing::debug!(client = %self.client.name, "token expired on an open connection");
        self.set_identity(None);
        let dropped = self.drop_private(|_| true, Some(ErrorCode::TokenExpired));
        if dropped == 0 {
            // Not a reply to a request: outside the error budget.
            self.state.stats.client_error(ErrorCode::TokenExpired);
            self.send(msg::error(
                None,
                ErrorCode::TokenExpired,
                "your token has expired; private channels need a fresh one",
                &None,
            ));
        }
    }

    /// Unsubscribes private channels matching `which`, each with `unsubscribed` and, when given,
    /// an error with `code`. Returns how many were dropped.
    fn drop_private(&mut self, which: impl Fn(&Held) -> bool, code: Option<ErrorCode>) -> usize {
        let mut n = 0;
        for held in self.client.subscriptions() {
            if held.channel.private_user().is_none() || !which(&held) {
                continue;
            }
            if self.state.hub.detach(&self.client, &held) {
                n += 1;
                self.send(msg::unsubscribed(&held.name, &None));
                if let Some(code) = code {
                    self.state.stats.client_error(code);
                    self.send(msg::error(
                        Some(&held.name),
                        code,
                        "your token has expired; send {\"type\":\"auth\",\"token\":...} with a fresh one and subscribe again",
                        &None,
                    ));
                }
            }
        }
        n
    }
}

/// Checks that each option given applies to the channel's kind (PROTOCOL.md § Subscription
/// options); the error names the option and where it applies.
fn options_apply(channel: &Channel, options: SubOptions) -> Result<SubOptions, String> {
    let kind = channel.kind();
    if options.history.is_some() && !matches!(channel, Channel::Klines(..) | Channel::Trades(_)) {
        return Err(format!(
            "option history applies to klines and trades channels, not {kind}"
        ));
    }
    if options.throttle_ms.is_some()
        && !matches!(
            channel,
            Channel::Price(_) | Channel::Ticker(_) | Channel::Depth(..) | Channel::Klines(..)
        )
    {
        return Err(format!(
            "option throttleMs applies to price, ticker, depth and klines channels, not {kind}: every {kind} message counts"
        ));
    }
    Ok(options)
}

/// Sends the last words and the close frame, then completes the closing handshake: reads (and
/// discards) until the client's close or EOF. Dropping a socket with unread input makes the
/// kernel send RST, which can destroy the close frame before the client reads it. All of it
/// within [`CLOSE_TIMEOUT`], for peers that are stuck or gone.
pub async fn finish(ws: &mut Incoming, client: &Client, close: Close) {
    if close.code == close::ABNORMAL {
        return; // the connection is gone
    }
    let _ = timeout(CLOSE_TIMEOUT, async {
        client.outbox.write_close(&close).await?;
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}
