//! JWT at connect and by `auth` message, private channels, expiry on an open connection, and
//! `POST /api/v1/publish`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

async fn publish(relay: &common::Relay, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(relay.http("/api/v1/publish"))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_valid_token_at_connect_opens_the_users_private_channels() {
    let (_sim, relay) = start().await;
    let url = format!("{}?token={}", relay.ws_url(), token("user123", 300));
    let mut c = Client::connect_url(&url, None).await;
    let hello = c.hello.clone().unwrap();
    assert_eq!(hello["data"]["authenticated"], true);
    assert_eq!(hello["data"]["userId"], "user123");

    c.subscribe(&["portfolio:user123", "orders:user123", "orders:someoneelse"])
        .await;
    c.recv_until(is_msg("subscribed", "portfolio:user123"))
        .await;
    c.recv_until(is_msg("subscribed", "orders:user123")).await;
    let e = c.recv_until(is_type("error")).await;
    assert_eq!(
        (error_code(&e), e["channel"].clone()),
        ("FORBIDDEN", json!("orders:someoneelse"))
    );

    let (status, body) = publish(
        &relay,
        Some(PUBLISH_KEY),
        json!({"channel": "orders:user123", "data": {"orderId": 42, "status": "filled"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"success": true, "data": {"delivered": 1}}));
    let m = c.recv_until(is_type("orders")).await;
    assert_eq!(m["channel"], "orders:user123");
    assert_eq!(m["data"], json!({"orderId": 42, "status": "filled"}));
}

#[tokio::test]
async fn the_authorization_header_works_too() {
    let (_sim, relay) = start().await;
    let c = Client::connect_url(&relay.ws_url(), Some(&token("alice", 300))).await;
    assert_eq!(c.hello.unwrap()["data"]["userId"], "alice");
}

#[tokio::test]
async fn bad_tokens_at_connect_get_an_error_then_1008() {
    let (_sim, relay) = start().await;
    let now = chrono::Utc::now().timestamp();
    let cases = [
        (
            token_with("wrong-secret", json!({"sub": "u", "exp": now + 60})),
            "INVALID_TOKEN",
        ),
        (token("u", -30), "TOKEN_EXPIRED"),
        // alg:none, unsigned.
        (
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ."
                .to_string(),
            "INVALID_TOKEN",
        ),
        ("not-a-jwt".to_string(), "INVALID_TOKEN"),
    ];
    for (t, code) in cases {
        let url = format!("{}?token={t}", relay.ws_url());
        let mut c = Client::open(&url, None, None).await.unwrap();
        let (close, _, before) = c.recv_close().await;
        assert_eq!(close, 1008, "{code}");
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(error_code(&before[0]), code);
    }
}

#[tokio::test]
async fn private_channels_need_a_token_and_the_auth_message_gives_one() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.subscribe(&["portfolio:bob"]).await;
    let e = c.recv().await;
    assert_eq!(error_code(&e), "AUTH_REQUIRED");
    assert_eq!(
        e["data"]["message"],
        "Authentication required for this channel"
    );

    c.send(json!({"type": "auth", "token": token_with("nope", json!({"sub": "bob", "exp": 4102444800i64})), "id": 1})).await;
    let e = c.recv().await;
    assert_eq!(
        (error_code(&e), e["id"].clone()),
        ("INVALID_TOKEN", json!(1))
    );

    let t = token("bob", 300);
    c.send(json!({"type": "auth", "token": t, "id": 2})).await;
    let a = c.recv().await;
    assert_eq!(a["type"], "authenticated");
    assert_eq!(a["data"]["userId"], "bob");
    assert!(a["data"]["expiresAt"].as_i64().unwrap() > chrono::Utc::now().timestamp());
    assert_eq!(a["id"], 2);
    c.subscribe(&["portfolio:bob"]).await;
    assert_eq!(c.recv().await["type"], "subscribed");
}

#[tokio::test]
async fn an_expiring_token_drops_private_channels_and_keeps_public_ones() {
    let (_sim, relay) = start().await;
    let mut c = Client::connect(&relay).await;
    c.send(json!({"type": "auth", "token": token("carol", 2)}))
        .await;
    assert_eq!(c.recv().await["type"], "authenticated");
    c.subscribe(&["orders:carol", "price:BTCUSDT"]).await;
    c.recv_until(is_msg("subscribed", "orders:carol")).await;
    let u = c.recv_until(is_type("unsubscribed")).await;
    assert_eq!(u["channel"], "orders:carol");
    let e = c.recv_until(is_type("error")).await;
    assert_eq!(
        (error_code(&e), e["channel"].clone()),
        ("TOKEN_EXPIRED", json!("orders:carol"))
    );
    c.send(json!({"type": "list"})).await;
    assert_eq!(
        c.recv_until(is_type("subscriptions")).await["channels"],
        json!(["price:BTCUSDT"])
    );
    c.recv_until(is_type("price")).await;
}

#[tokio::test]
async fn expiry_on_an_open_connection_applies_the_same_leeway_as_at_connect() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.auth.jwt_leeway_secs = 2;
    let relay = start_relay(cfg).await;
    let exp = chrono::Utc::now().timestamp() + 1;
    let mut c = Client::connect(&relay).await;
    c.send(
        json!({"type": "auth", "token": token_with(SECRET, json!({"sub": "carol", "exp": exp}))}),
    )
    .await;
    assert_eq!(c.recv().await["type"], "authenticated");
    c.subscribe(&["orders:carol"]).await;
    c.recv_until(is_msg("subscribed", "orders:carol")).await;
    c.recv_until(is_type("unsubscribed")).await;
    let dropped_at = chrono::Utc::now().timestamp_millis();
    // Accepted at connect until exp + leeway, so kept open until then too, not dropped at exp.
    assert!(
        dropped_at > (exp + 2) * 1000,
        "dropped {} ms before exp + leeway",
        (exp + 2) * 1000 - dropped_at
    );
}

#[tokio::test]
async fn publish_checks_its_key_and_channel() {
    let (_sim, relay) = start().await;
    let (status, body) = publish(
        &relay,
        None,
        json!({"channel": "signals:BTCUSDT", "data": {}}),
    )
    .await;
    assert_eq!(
        (
            status,
            body["success"].clone(),
            body["error"]["code"].clone()
        ),
        (401, json!(false), json!("UNAUTHORIZED"))
    );
    let (status, _) = publish(
        &relay,
        Some("wrong"),
        json!({"channel": "signals:BTCUSDT", "data": {}}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = publish(
        &relay,
        Some(PUBLISH_KEY),
        json!({"channel": "price:BTCUSDT", "data": {}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("INVALID_CHANNEL"))
    );
    let (status, body) = publish(
        &relay,
        Some(PUBLISH_KEY),
        json!({"channel": "signals:BTCUSDT"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Signals are public: any client can subscribe, every subscriber gets each message.
    let mut a = Client::connect(&relay).await;
    let mut b = Client::connect(&relay).await;
    for c in [&mut a, &mut b] {
        c.subscribe(&["signals:BTCUSDT"]).await;
        assert_eq!(c.recv().await["type"], "subscribed");
    }
    assert_eq!(relay.stats().await["signalStreams"], 1);
    let (status, body) = publish(
        &relay,
        Some(PUBLISH_KEY),
        json!({"channel": "signals:BTCUSDT", "data": {"action": "buy", "confidence": 0.8}}),
    )
    .await;
    assert_eq!((status, body["data"]["delivered"].clone()), (200, json!(2)));
    for c in [&mut a, &mut b] {
        let m = c.recv().await;
        assert_eq!(
            (m["type"].clone(), m["channel"].clone()),
            (json!("signal"), json!("signals:BTCUSDT"))
        );
        assert_eq!(m["data"]["action"], "buy");
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/auth")
        .join(name)
}

fn signed(alg: jsonwebtoken::Algorithm, private_pem: &str, claims: Value) -> String {
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
}

#[tokio::test]
async fn public_key_relays_accept_rs256_and_es256_and_refuse_algorithm_confusion() {
    let sim = start_sim().await;
    let exp = chrono::Utc::now().timestamp() + 300;
    let claims = json!({"sub": "dave", "exp": exp});

    let mut cfg = config_for(&sim);
    cfg.auth.jwt_public_key_file = Some(fixture("rsa_public.pem"));
    let relay = start_relay(cfg).await;
    let ok = hello_for(
        &relay,
        &signed(
            jsonwebtoken::Algorithm::RS256,
            "rsa_private.pem",
            claims.clone(),
        ),
    )
    .await;
    assert_eq!(ok.unwrap()["data"]["userId"], "dave");
    // The classic confusion attack: HS256 signed with the public key as the HMAC secret.
    let public_pem = std::fs::read_to_string(fixture("rsa_public.pem")).unwrap();
    let forged = token_with(&public_pem, claims.clone());
    assert_eq!(
        hello_for(&relay, &forged).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
    // An HS256 token with the relay's old shared secret is not accepted either.
    assert_eq!(
        hello_for(&relay, &token("dave", 300)).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
    // Another key of another type.
    let es = signed(
        jsonwebtoken::Algorithm::ES256,
        "ec_private.pem",
        claims.clone(),
    );
    assert_eq!(hello_for(&relay, &es).await.unwrap_err().0, "INVALID_TOKEN");

    let mut cfg = config_for(&sim);
    cfg.auth.jwt_public_key_file = Some(fixture("ec_public.pem"));
    let relay = start_relay(cfg).await;
    assert_eq!(
        hello_for(&relay, &es).await.unwrap()["data"]["userId"],
        "dave"
    );
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let sim = start_sim().await;
    let mut cfg = config_for(&sim);
    cfg.auth.jwt_issuer = Some("https://auth.example.com".into());
    cfg.auth.jwt_audience = Some("trading".into());
    let relay = start_relay(cfg).await;
    let exp = chrono::Utc::now().timestamp() + 300;
    let good = token_with(
        SECRET,
        json!({"sub": "erin", "exp": exp, "iss": "https://auth.example.com", "aud": "trading"}),
    );
    assert!(hello_for(&relay, &good).await.is_ok());
    let wrong_iss = token_with(
        SECRET,
        json!({"sub": "erin", "exp": exp, "iss": "https://evil", "aud": "trading"}),
    );
    assert_eq!(
        hello_for(&relay, &wrong_iss).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
    let wrong_aud = token_with(
        SECRET,
        json!({"sub": "erin", "exp": exp, "iss": "https://auth.example.com", "aud": "other"}),
    );
    assert_eq!(
        hello_for(&relay, &wrong_aud).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
    let missing = token_with(SECRET, json!({"sub": "erin", "exp": exp}));
    assert_eq!(
        hello_for(&relay, &missing).await.unwrap_err().0,
        "INVALID_TOKEN"
    );
}
