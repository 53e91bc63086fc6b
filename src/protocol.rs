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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
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
        }
    }
}

/// The `type` of every request a client may send (`action` is its older alias).
pub const REQUEST_TYPES: [&str; 5] = ["subscribe", "unsubscribe", "ping", "auth", "list"];

/// The `type` of every server message that is not channel data (data messages take their
/// channel's type, [`Channel::message_type`]).
pub const CONTROL_TYPES: [&str; 7] = [
    "connected",
    "subscribed",
    "unsubscribed",
    "pong",
    "authenticated",
    "subscriptions",
    "error",
];

/// A request id: echoed on every direct reply. Kept as raw JSON so `1` and `"1"` come back as sent.
pub type RequestId = Option<Value>;

/// A parsed client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Subscribe(Vec<String>),
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
            let channels = channel_list(&obj).map_err(|m| RequestError {
                id: id.clone(),
                code: ErrorCode::InvalidChannel,
                message: format!("{kind} {m}"),
            })?;
            if kind == "subscribe" {
                Request::Subscribe(channels)
            } else {
                Request::Unsubscribe(channels)
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

/// `"channels": [...]`, or a single `"channel": "..."` for hand-typed requests.
fn channel_list(obj: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
    let as_name = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("channel names must be strings, got {other}")),
    };
    match (obj.get("channels"), obj.get("channel")) {
        (Some(Value::Array(items)), _) if !items.is_empty() => items.iter().map(as_name).collect(),
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => Ok(vec![s.clone()]),
        _ => Err(
            "needs \"channels\": a non-empty array of channel names, e.g. [\"price:BTCUSDT\"]"
                .into(),
        ),
    }
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
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    timestamp: String,
}

fn envelope<D: Serialize>(
    kind: &str,
    channel: Option<&str>,
    channels: Option<&[String]>,
    data: Option<D>,
    id: &RequestId,
) -> Frame {
    let msg = Envelope {
        kind,
        channel,
        channels,
        data,
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

    pub fn subscribed(channel: &str, id: &RequestId) -> Frame {
        envelope::<()>("subscribed", Some(channel), None, None, id)
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
    pub fn published(channel: &Channel, channel_name: &str, data: &Value) -> Frame {
        envelope(
            channel.message_type(),
            Some(channel_name),
            None,
            Some(data),
            &None,
        )
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
        let frames = [
            msg::connected("c-1", None, 50),
            msg::subscribed("price:BTCUSDT", &id),
            msg::unsubscribed("price:BTCUSDT", &id),
            msg::pong(&id),
            msg::authenticated("u", Some(1), &id),
            msg::subscriptions(&[], &id),
            msg::error(None, ErrorCode::InvalidJson, "x", &id),
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
                Request::Subscribe(vec!["price:BTCUSDT".into()])
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
        let v: Value =
            serde_json::from_str(msg::subscribed("price:BTCUSDT", &Some(json!(1))).as_str())
                .unwrap();
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
