//! The client wire protocol of PROTOCOL.md: requests parsed from text frames, server messages
//! serialised to shared [`Frame`]s, error codes and close codes.

use serde::Serialize;
use serde_json::Value;

use crate::domain::Channel;

/// A serialised server message. Cloning shares the bytes (a reference-count bump), so one
/// serialisation serves every subscriber.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// Close codes of PROTOCOL.md.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Never sent as such: a close frame without a code (the reply to one).
    pub const NO_STATUS: u16 = 1005;
    /// Never sent: the connection was lost, there is no one to send a close frame to.
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Every error code of PROTOCOL.md § Errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    InvalidJson,
    UnknownType,
    InvalidChannel,
    UnknownExchange,
    UnknownSymbol,
    Unsupported,
    SubscriptionLimit,
    AuthRequired,
    Forbidden,
    InvalidToken,
    TokenExpired,
    NotSubscribed,
    RateLimited,
    UpstreamUnavailable,
    SlowConsumer,
    InvalidOption,
    HistoryUnavailable,
    /// Beyond `server.max_connections_per_user`: sent before closing with 1008.
    TooManyConnections,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::InvalidJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidChannel,
        ErrorCode::UnknownExchange,
        ErrorCode::UnknownSymbol,
        ErrorCode::Unsupported,
        ErrorCode::SubscriptionLimit,
        ErrorCode::AuthRequired,
        ErrorCode::Forbidden,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::NotSubscribed,
        ErrorCode::RateLimited,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::SlowConsumer,
        ErrorCode::InvalidOption,
        ErrorCode::HistoryUnavailable,
        ErrorCode::TooManyConnections,
    ];

    /// The code as sent (the match is exhaustive: a new code cannot miss its spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::InvalidChannel => "INVALID_CHANNEL",
            ErrorCode::UnknownExchange => "UNKNOWN_EXCHANGE",
            ErrorCode::UnknownSymbol => "UNKNOWN_SYMBOL",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::SubscriptionLimit => "SUBSCRIPTION_LIMIT",
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::InvalidToken => "INVALID_TOKEN",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::NotSubscribed => "NOT_SUBSCRIBED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::InvalidOption => "INVALID_OPTION",
            ErrorCode::HistoryUnavailable => "HISTORY_UNAVAILABLE",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
        }
    }
}

/// The `type` of every request a client may send (`action` is its older alias).
pub const REQUEST_TYPES: [&str; 5] = ["subscribe", "unsubscribe", "ping", "auth", "list"];

/// The `type` of every server message that is not channel data (data messages take their
/// channel's type, [`Channel::message_type`]).
pub const CONTROL_TYPES: [&str; 9] = [
    "connected",
    "subscribed",
    "unsubscribed",
    "pong",
    "authenticated",
    "subscriptions",
    "error",
    "history",
    "gap",
];

/// A request id: echoed on every direct reply. Kept as raw JSON so `1` and `"1"` come back as sent.
pub type RequestId = Option<Value>;

/// `since` of a subscription: where the client's copy of the channel ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: String,
    pub seq: u64,
}

/// The options of one `channels` entry (PROTOCOL.md § Subscription options), as sent; whether
/// they apply to the channel's kind is the subscriber's check, once the channel is parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubOptions {
    pub history: Option<u64>,
    pub throttle_ms: Option<u64>,
    pub since: Option<Since>,
}

/// One entry of a subscribe request's `channels`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubEntry {
    pub name: String,
    /// Written as an object (options replace those of a held subscription).
    pub object: bool,
    /// The options, or why they are invalid (`INVALID_OPTION` for this channel only).
    pub options: Result<SubOptions, String>,
}

impl SubEntry {
    pub fn plain(name: &str) -> SubEntry {
        SubEntry {
            name: name.to_string(),
            object: false,
            options: Ok(SubOptions::default()),
        }
    }
}

/// The options a `channels` object may carry, besides `channel`.
pub const OPTION_NAMES: [&str; 3] = ["history", "throttleMs", "since"];
pub const HISTORY_RANGE: (u64, u64) = (1, 1000);
pub const THROTTLE_RANGE: (u64, u64) = (100, 60_000);

/// A parsed client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Subscribe(Vec<SubEntry>),
    Unsubscribe(Vec<String>),
    Ping,
    Auth(String),
    List,
}

/// A request that could not be understood: answered with `code` and `message`, echoing `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: RequestId,
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one text frame. The id is returned whether or not the rest parses, so errors echo it.
pub fn parse_request(text: &str) -> Result<(RequestId, Request), RequestError> {
    let fail = |id: RequestId, code, message: &str| RequestError {
        id,
        code,
        message: message.to_string(),
    };
    let value: Value = serde_json::from_str(text).map_err(|e| RequestError {
        id: None,
        code: ErrorCode::InvalidJson,
        message: not_json_hint(text, &e),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(fail(
            None,
            ErrorCode::InvalidJson,
            "message must be a JSON object like {\"type\":\"ping\"}",
        ));
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v),
        Some(_) => {
            return Err(fail(
                None,
                ErrorCode::InvalidJson,
                "\"id\" must be a string or a number",
            ))
        }
    };
    let kind = match obj.get("type").or_else(|| obj.get("action")) {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(fail(
                id,
                ErrorCode::UnknownType,
                "\"type\" must be a string",
            ));
        }
        None => {
            return Err(fail(
                id,
                ErrorCode::UnknownType,
                &format!(
                    "missing \"type\"; expected one of {}",
                    REQUEST_TYPES.join(", ")
                ),
            ))
        }
    };
    let request = match kind {
        "subscribe" | "unsubscribe" => {
            let channels = channel_list(&obj, kind == "subscribe").map_err(|m| RequestError {
                id: id.clone(),
                code: ErrorCode::InvalidChannel,
                message: format!("{kind} {m}"),
            })?;
            if kind == "subscribe" {
                Request::Subscribe(channels)
            } else {
                Request::Unsubscribe(channels.into_iter().map(|e| e.name).collect())
            }
        }
        "ping" => Request::Ping,
        "list" => Request::List,
        "auth" => match obj.get("token") {
            Some(Value::String(t)) if !t.is_empty() => Request::Auth(t.clone()),
            _ => {
                return Err(fail(
                    id,
                    ErrorCode::InvalidToken,
                    "auth needs \"token\": a JWT string",
                ))
            }
        },
        other => {
            return Err(RequestError {
                id,
                code: ErrorCode::UnknownType,
                message: format!(
                    "unknown type '{other}'; expected one of {}",
                    REQUEST_TYPES.join(", ")
                ),
            })
        }
    };
    Ok((id, request))
}

/// Why a frame is not JSON, in words that say what to change: the common slips of a person
/// typing or pasting into wscat first.
fn not_json_hint(text: &str, e: &serde_json::Error) -> String {
    let t = text.trim_start();
    if let Some(rest) = t.strip_prefix('>') {
        if rest.trim_start().starts_with('{') {
            return "the message starts with '>': that is wscat's prompt, not part of the message; send only the JSON object, e.g. {\"type\":\"ping\"}".into();
        }
    }
    if t.starts_with('{') && t.contains('\'') && !t.contains('"') {
        return "JSON needs double quotes: send {\"type\":\"ping\"}, not {'type':'ping'}".into();
    }
    if t.is_empty() {
        return "the message is empty; send a JSON object like {\"type\":\"ping\"}".into();
    }
    format!("message is not valid JSON ({e}); send an object like {{\"type\":\"ping\"}}")
}

/// `"channels": [...]`, or a single `"channel": "..."` for hand-typed requests. Each entry is
/// a name or (subscribe only) an object `{"channel": name, options...}`.
fn channel_list(
    obj: &serde_json::Map<String, Value>,
    objects: bool,
) -> Result<Vec<SubEntry>, String> {
    let entry = |v: &Value| {
        match v {
        Value::String(s) => Ok(SubEntry::plain(s)),
        Value::Object(o) if objects => match o.get("channel") {
            Some(Value::String(name)) => Ok(SubEntry {
                name: name.clone(),
                object: true,
                options: parse_options(o),
            }),
            _ => Err("entries that are objects need \"channel\": a channel name, e.g. {\"channel\":\"klines:BTCUSDT:1m\",\"history\":500}".to_string()),
        },
        other => Err(format!("channel names must be strings, got {other}")),
    }
    };
    match (obj.get("channels"), obj.get("channel")) {
        (Some(Value::Array(items)), _) if !items.is_empty() => items.iter().map(entry).collect(),
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => {
            Ok(vec![SubEntry::plain(s)])
        }
        _ => Err(
            "needs \"channels\": a non-empty array of channel names, e.g. [\"price:BTCUSDT\"]"
                .into(),
        ),
    }
}

/// The options of one `channels` object; the error names the option and what it allows.
fn parse_options(o: &serde_json::Map<String, Value>) -> Result<SubOptions, String> {
    let mut opts = SubOptions::default();
    let int = |name: &str, v: &Value, (lo, hi): (u64, u64)| match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!(
            "option {name} must be an integer from {lo} to {hi}, got {v}"
        )),
    };
    for (k, v) in o {
        match k.as_str() {
            "channel" => {}
            "history" => opts.history = Some(int(k, v, HISTORY_RANGE)?),
            "throttleMs" => opts.throttle_ms = Some(int(k, v, THROTTLE_RANGE)?),
            "since" => {
                let bad = || {
                    format!("option since must be {{\"epoch\":\"...\",\"seq\":N}} as taken from an earlier message on the channel, got {v}")
                };
                let s = v.as_object().ok_or_else(bad)?;
                let epoch = s.get("epoch").and_then(Value::as_str).ok_or_else(bad)?;
                let seq = s.get("seq").and_then(Value::as_u64).ok_or_else(bad)?;
                if s.len() != 2 || epoch.is_empty() {
                    return Err(bad());
                }
                opts.since = Some(Since {
                    epoch: epoch.to_string(),
                    seq,
                });
            }
            other => {
                return Err(format!(
                    "unknown option {other}; the options are {}",
                    OPTION_NAMES.join(", ")
                ))
            }
        }
    }
    if opts.since.is_some() && opts.history.is_some() {
        return Err("options since and history cannot be combined: since resumes where you left off, history starts afresh".into());
    }
    Ok(opts)
}

/// Formats ms since the epoch as ISO-8601 UTC with milliseconds (`2024-12-06T12:00:00.000Z`).
pub fn iso_millis(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The current time as ms since the epoch.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The current time as PROTOCOL.md's `timestamp`.
pub fn now_iso() -> String {
    iso_millis(now_millis())
}

#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<D>,
    #[serde(flatten)]
    position: Option<Position<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    timestamp: String,
}

/// Where a channel's sequence stands: `epoch` names the sequence, `seq` is a message number in
/// it (PROTOCOL.md § Sequence numbers and recovery).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Position<'a> {
    pub epoch: &'a str,
    pub seq: u64,
}

fn envelope<D: Serialize>(
    kind: &str,
    channel: Option<&str>,
    channels: Option<&[String]>,
    data: Option<D>,
    id: &RequestId,
) -> Frame {
    positioned(kind, channel, channels, data, None, None, id)
}

fn positioned<D: Serialize>(
    kind: &str,
    channel: Option<&str>,
    channels: Option<&[String]>,
    data: Option<D>,
    position: Option<Position<'_>>,
    recovered: Option<bool>,
    id: &RequestId,
) -> Frame {
    let msg = Envelope {
        kind,
        channel,
        channels,
        data,
        position,
        recovered,
        id: id.as_ref(),
        timestamp: now_iso(),
    };
    Frame::from(serde_json::to_string(&msg).unwrap_or_else(|_| String::from("{}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectedData<'a> {
    client_id: &'a str,
    authenticated: bool,
    user_id: Option<&'a str>,
    max_subscriptions: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthenticatedData<'a> {
    user_id: &'a str,
    expires_at: Option<i64>,
}

/// Why a `gap` was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The exchange produced data while the relay could not read it, and it could not be filled.
    UpstreamOutage,
    /// The relay's book was found inconsistent and rebuilt from a fresh snapshot.
    BookResync,
    /// `since` asked for messages the recovery window no longer holds.
    RecoveryWindow,
    /// `since` named another sequence than the channel's current one.
    EpochChanged,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::UpstreamOutage => "upstream_outage",
            GapReason::BookResync => "book_resync",
            GapReason::RecoveryWindow => "recovery_window",
            GapReason::EpochChanged => "epoch_changed",
        }
    }

    pub const ALL: [GapReason; 4] = [
        GapReason::UpstreamOutage,
        GapReason::BookResync,
        GapReason::RecoveryWindow,
        GapReason::EpochChanged,
    ];
}

#[derive(Serialize)]
struct GapData {
    reason: GapReason,
    from: Option<String>,
    to: Option<String>,
}

/// A published message: `seq` beside `channel`, as on every data message.
#[derive(Serialize)]
struct Published<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: &'a str,
    seq: u64,
    data: &'a Value,
    timestamp: String,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: ErrorCode,
    message: &'a str,
}

/// Server messages other than market data.
pub mod msg {
    use super::*;

    pub fn connected(client_id: &str, user_id: Option<&str>, max_subscriptions: usize) -> Frame {
        let data = ConnectedData {
            client_id,
            authenticated: user_id.is_some(),
            user_id,
            max_subscriptions,
        };
        envelope("connected", None, None, Some(data), &None)
    }

    /// The ack of a subscription: where the channel's sequence stands and, when the client
    /// asked to resume (`since`), whether it did.
    pub fn subscribed(
        channel: &str,
        position: Position<'_>,
        recovered: Option<bool>,
        id: &RequestId,
    ) -> Frame {
        positioned::<()>(
            "subscribed",
            Some(channel),
            None,
            None,
            Some(position),
            recovered,
            id,
        )
    }

    /// A gap notice: `reason`, and the first and last moment data may be missing (`null`
    /// where the relay cannot know).
    pub fn gap(
        channel: &str,
        reason: GapReason,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        position: Position<'_>,
    ) -> Frame {
        let data = GapData {
            reason,
            from: from_ms.map(iso_millis),
            to: to_ms.map(iso_millis),
        };
        positioned(
            "gap",
            Some(channel),
            None,
            Some(data),
            Some(position),
            None,
            &None,
        )
    }

    /// A `history` message: `items` are the channel's data objects, serialised, oldest first.
    pub fn history(channel: &str, items: &[String], position: Position<'_>) -> Frame {
        let mut data = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
        data.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                data.push(',');
            }
            data.push_str(item);
        }
        data.push(']');
        let raw = serde_json::value::RawValue::from_string(data).ok();
        positioned(
            "history",
            Some(channel),
            None,
            raw,
            Some(position),
            None,
            &None,
        )
    }

    pub fn unsubscribed(channel: &str, id: &RequestId) -> Frame {
        envelope::<()>("unsubscribed", Some(channel), None, None, id)
    }

    pub fn pong(id: &RequestId) -> Frame {
        envelope::<()>("pong", None, None, None, id)
    }

    pub fn authenticated(user_id: &str, expires_at: Option<i64>, id: &RequestId) -> Frame {
        let data = AuthenticatedData {
            user_id,
            expires_at,
        };
        envelope("authenticated", None, None, Some(data), id)
    }

    pub fn subscriptions(channels: &[String], id: &RequestId) -> Frame {
        envelope::<()>("subscriptions", None, Some(channels), None, id)
    }

    pub fn error(channel: Option<&str>, code: ErrorCode, message: &str, id: &RequestId) -> Frame {
        envelope(
            "error",
            channel,
            None,
            Some(ErrorData { code, message }),
            id,
        )
    }

    /// A message published by a backend service: `data` is passed through as sent.
    pub fn published(channel: &Channel, channel_name: &str, data: &Value, seq: u64) -> Frame {
        let msg = Published {
            kind: channel.message_type(),
            channel: channel_name,
            seq,
            data,
            timestamp: now_iso(),
        };
        Frame::from(serde_json::to_string(&msg).unwrap_or_else(|_| String::from("{}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_codes_are_spelled_as_serialised() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn every_control_message_is_listed() {
        let id = Some(json!(1));
        let at = Position {
            epoch: "e1",
            seq: 3,
        };
        let frames = [
            msg::connected("c-1", None, 50),
            msg::subscribed("price:BTCUSDT", at, None, &id),
            msg::unsubscribed("price:BTCUSDT", &id),
            msg::pong(&id),
            msg::authenticated("u", Some(1), &id),
            msg::subscriptions(&[], &id),
            msg::error(None, ErrorCode::InvalidJson, "x", &id),
            msg::history("trades:BTCUSDT", &["{}".to_string()], at),
            msg::gap(
                "trades:BTCUSDT",
                GapReason::BookResync,
                Some(1),
                Some(2),
                at,
            ),
        ];
        let types: Vec<String> = frames
            .iter()
            .map(|f| {
                let v: Value = serde_json::from_str(f.as_str()).unwrap();
                v["type"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(types, CONTROL_TYPES);
        for kind in REQUEST_TYPES {
            let text = match kind {
                "subscribe" | "unsubscribe" => {
                    format!(r#"{{"type":"{kind}","channels":["price:X"]}}"#)
                }
                "auth" => r#"{"type":"auth","token":"t"}"#.to_string(),
                _ => format!(r#"{{"type":"{kind}"}}"#),
            };
            assert!(parse_request(&text).is_ok(), "{kind}");
        }
    }

    #[test]
    fn requests_parse_with_type_or_action() {
        assert_eq!(
            parse_request(r#"{"type":"subscribe","channels":["price:BTCUSDT"],"id":1}"#),
            Ok((
                Some(json!(1)),
                Request::Subscribe(vec![SubEntry::plain("price:BTCUSDT")])
            ))
        );
        assert_eq!(
            parse_request(r#"{"action":"unsubscribe","channels":["a"],"id":"x"}"#),
            Ok((Some(json!("x")), Request::Unsubscribe(vec!["a".into()])))
        );
        assert_eq!(
            parse_request(r#"{"type":"ping"}"#),
            Ok((None, Request::Ping))
        );
        assert_eq!(
            parse_request(r#"{"type":"list"}"#),
            Ok((None, Request::List))
        );
        assert_eq!(
            parse_request(r#"{"type":"auth","token":"abc"}"#),
            Ok((None, Request::Auth("abc".into())))
        );
    }

    #[test]
    fn bad_requests_get_the_right_code_and_keep_the_id() {
        let code = |s: &str| parse_request(s).map(|_| ()).map_err(|e| (e.code, e.id));
        assert_eq!(code("not json"), Err((ErrorCode::InvalidJson, None)));
        assert_eq!(code("[1,2]"), Err((ErrorCode::InvalidJson, None)));
        assert_eq!(
            code(r#"{"id":7}"#),
            Err((ErrorCode::UnknownType, Some(json!(7))))
        );
        assert_eq!(
            code(r#"{"type":"dance","id":"a"}"#),
            Err((ErrorCode::UnknownType, Some(json!("a"))))
        );
        assert_eq!(
            code(r#"{"type":"subscribe","id":2}"#),
            Err((ErrorCode::InvalidChannel, Some(json!(2))))
        );
        assert_eq!(
            code(r#"{"type":"subscribe","channels":[1]}"#),
            Err((ErrorCode::InvalidChannel, None))
        );
        assert_eq!(
            code(r#"{"type":"auth"}"#),
            Err((ErrorCode::InvalidToken, None))
        );
    }

    #[test]
    fn iso_timestamps_have_milliseconds() {
        assert_eq!(iso_millis(1_733_486_400_000), "2024-12-06T12:00:00.000Z");
        assert_eq!(iso_millis(1_701_806_400_123), "2023-12-05T20:00:00.123Z");
    }

    #[test]
    fn server_messages_match_the_contract() {
        let at = Position {
            epoch: "e1",
            seq: 0,
        };
        let v: Value = serde_json::from_str(
            msg::subscribed("price:BTCUSDT", at, Some(true), &Some(json!(1))).as_str(),
        )
        .unwrap();
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["seq"], 0);
        assert_eq!(v["recovered"], true);
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["channel"], "price:BTCUSDT");
        assert_eq!(v["id"], 1);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        let v: Value = serde_json::from_str(
            msg::error(Some("price:X"), ErrorCode::UnknownSymbol, "no", &None).as_str(),
        )
        .unwrap();
        assert_eq!(v["data"]["code"], "UNKNOWN_SYMBOL");
        assert!(v.get("id").is_none());
        let v: Value = serde_json::from_str(msg::connected("c-1", None, 50).as_str()).unwrap();
        assert_eq!(
            v["data"],
            json!({"clientId":"c-1","authenticated":false,"userId":null,"maxSubscriptions":50})
        );
    }
}
