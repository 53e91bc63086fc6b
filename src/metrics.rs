//! `GET /metrics`: the Prometheus exposition of the same counters `/api/v1/ws/stats` reads.
//! prometheus-client encodes the text; the values come from a [`Collector`] that reads the
//! relay's own atomics and snapshots at scrape time, so the data path keeps bumping plain
//! relaxed atomics and a scrape takes no lock the fan-out takes (the hub's snapshot locks
//! each topic briefly, as `/api/v1/ws/stats` does).
//!
//! Names follow Prometheus conventions: a `relay_` prefix, base units in the name, `_total`
//! on counters (added by the encoder), labels for the exchange, kind and code.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::cluster::Cluster;
use crate::exchange::Upstreams;
use crate::hub::Hub;
use crate::stats::{HistogramSnapshot, Stats};

/// What a scrape reads.
struct Sources {
    stats: Arc<Stats>,
    hub: Arc<Hub>,
    upstreams: Arc<Upstreams>,
    cluster: Option<Arc<Cluster>>,
    auth: Arc<crate::auth::Auth>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("relay metrics")
    }
}

/// The registry `/metrics` encodes.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(
        stats: Arc<Stats>,
        hub: Arc<Hub>,
        upstreams: Arc<Upstreams>,
        cluster: Option<Arc<Cluster>>,
        auth: Arc<crate::auth::Auth>,
    ) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Sources {
            stats,
            hub,
            upstreams,
            cluster,
            auth,
        }));
        Metrics { registry }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in series {
        if labels.is_empty() {
            ConstGauge::new(*v).encode(m.encode_family(&Vec::<(String, String)>::new())?)?;
        } else {
            ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
        }
    }
    Ok(())
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, HistogramSnapshot)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in series {
        // The encoder sums the buckets itself: hand it each bucket's own count.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|(bound, cumulative)| {
                let own = cumulative.saturating_sub(below);
                below = *cumulative;
                (*bound, own)
            })
            .collect();
        buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
        m.encode_family(labels)?
            .encode_histogram::<Vec<(String, String)>>(h.sum, h.count, &buckets, None)?;
    }
    Ok(())
}

fn none() -> Labels {
    Vec::new()
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.stats.counters();
        let upstreams = self.upstreams.snapshot();
        let health = self.upstreams.health();

        // Read from counters the hub keeps as subscriptions change, not from its topics: a
        // scrape takes no lock the fan-out takes.
        let clients = self.hub.connected_clients() as i64;
        gauge(
            &mut e,
            "relay_connected_clients",
            "WebSocket clients connected now",
            None,
            &[(none(), clients)],
        )?;
        let subs: Vec<(Labels, i64)> = self
            .stats
            .subscriptions()
            .into_iter()
            .map(|(kind, n)| (vec![("kind", kind.to_string())], n))
            .collect();
        gauge(
            &mut e,
            "relay_subscriptions",
            "Subscriptions held by clients, by channel kind",
            None,
            &subs,
        )?;
        let channels = self.stats.channels();
        gauge(
            &mut e,
            "relay_channels",
            "Channels with at least one subscriber",
            None,
            &[(none(), channels)],
        )?;
        let windows = &self.hub.windows;
        gauge(
            &mut e,
            "relay_recovery_window",
            "Memory held by every channel's recovery window (messages kept for since)",
            Some(&Unit::Bytes),
            &[(
                none(),
                windows.bytes.load(std::sync::atomic::Ordering::Relaxed),
            )],
        )?;
        gauge(
            &mut e,
            "relay_recovery_window_messages",
            "Messages held by every channel's recovery window",
            None,
            &[(
                none(),
                windows.messages.load(std::sync::atomic::Ordering::Relaxed),
            )],
        )?;
        let labelled =
            |rows: Vec<(&'static str, u64)>, label: &'static str| -> Vec<(Labels, u64)> {
                rows.into_iter()
                    .map(|(l, n)| (vec![(label, l.to_string())], n))
                    .collect()
            };
        counter(
            &mut e,
            "relay_gaps",
            "Gap notices sent to clients, by reason (a channel's own notice once per channel)",
            &labelled(self.stats.gaps(), "reason"),
        )?;
        counter(
            &mut e,
            "relay_recoveries",
            "Subscribes with since, by outcome",
            &labelled(self.stats.recoveries(), "outcome"),
        )?;
        counter(
            &mut e,
            "relay_histories",
            "Histories asked for on subscribe, by outcome",
            &labelled(self.stats.histories(), "outcome"),
        )?;
        gauge(
            &mut e,
            "relay_uptime",
            "Time since the relay started",
            Some(&Unit::Seconds),
            &[(none(), c.uptime_seconds as i64)],
        )?;

        let mut msgs_in: Vec<(Labels, u64)> = upstreams
            .iter()
            .map(|u| {
                (
                    vec![("source", u.exchange.to_string())],
                    u.counters.messages,
                )
            })
            .collect();
        let from_exchanges: u64 = upstreams.iter().map(|u| u.counters.messages).sum();
        msgs_in.push((
            vec![("source", "clients".to_string())],
            c.messages_in.saturating_sub(from_exchanges),
        ));
        counter(
            &mut e,
            "relay_messages_in",
            "WebSocket messages received, by source (an exchange, or clients)",
            &msgs_in,
        )?;
        let out: Vec<(Labels, u64)> = self
            .stats
            .messages_out_by_kind()
            .into_iter()
            .map(|(kind, n)| (vec![("kind", kind.to_string())], n))
            .collect();
        counter(
            &mut e,
            "relay_messages_out",
            "Messages written or queued to clients, by message type",
            &out,
        )?;
        counter(
            &mut e,
            "relay_conflated_messages",
            "Queued values replaced by newer ones for clients that fell behind",
            &[(none(), c.conflated)],
        )?;
        counter(
            &mut e,
            "relay_slow_consumer_disconnects",
            "Clients closed with 1013 for not keeping up",
            &[(none(), c.slow_consumer_disconnects)],
        )?;
        counter(
            &mut e,
            "relay_rate_limited_requests",
            "Client requests refused with RATE_LIMITED",
            &[(none(), c.rate_limited)],
        )?;
        counter(
            &mut e,
            "relay_rejected_connections",
            "WebSocket upgrades refused (caps, origin)",
            &[(none(), c.rejected_connections)],
        )?;
        counter(
            &mut e,
            "relay_connections",
            "WebSocket clients ever connected",
            &[(none(), c.total_connections)],
        )?;
        let errors: Vec<(Labels, u64)> = self
            .stats
            .client_errors()
            .into_iter()
            .map(|(code, n)| (vec![("code", code.to_string())], n))
            .collect();
        counter(
            &mut e,
            "relay_client_errors",
            "Error replies to clients, by error code",
            &errors,
        )?;
        let refusals: Vec<(Labels, u64)> = self
            .stats
            .auth_refusals()
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason.to_string())], n))
            .collect();
        counter(
            &mut e,
            "relay_auth_refusals",
            "Tokens, private subscriptions, per-user connections and publish requests refused, by reason",
            &refusals,
        )?;

        let by_exchange =
            |f: &dyn Fn(&crate::exchange::UpstreamSnapshot) -> u64| -> Vec<(Labels, u64)> {
                upstreams
                    .iter()
                    .map(|u| (vec![("exchange", u.exchange.to_string())], f(u)))
                    .collect()
            };
        let by_state = |state: &str| -> Vec<(Labels, i64)> {
            health
                .iter()
                .map(|(id, h)| {
                    (
                        vec![("exchange", id.to_string())],
                        i64::from(h.state == state),
                    )
                })
                .collect()
        };
        let gauge_by_exchange =
            |f: &dyn Fn(&crate::exchange::UpstreamSnapshot) -> usize| -> Vec<(Labels, i64)> {
                upstreams
                    .iter()
                    .map(|u| (vec![("exchange", u.exchange.to_string())], f(u) as i64))
                    .collect()
            };
        gauge(
            &mut e,
            "relay_upstream_connected",
            "1 when every wanted connection to the exchange is open",
            None,
            &by_state("connected"),
        )?;
        gauge(
            &mut e,
            "relay_upstream_unreachable",
            "1 while the exchange cannot be reached",
            None,
            &by_state("unreachable"),
        )?;
        gauge(
            &mut e,
            "relay_upstream_connections",
            "Upstream connections open",
            None,
            &gauge_by_exchange(&|u| u.connections),
        )?;
        gauge(
            &mut e,
            "relay_upstream_streams",
            "Exchange streams requested on open connections",
            None,
            &gauge_by_exchange(&|u| u.streams.len()),
        )?;
        counter(
            &mut e,
            "relay_upstream_reconnects",
            "Upstream connections opened again after one was lost or renewed",
            &by_exchange(&|u| u.counters.reconnects),
        )?;
        counter(
            &mut e,
            "relay_upstream_connect_failures",
            "Upstream connect attempts that failed",
            &by_exchange(&|u| u.counters.connect_failures),
        )?;
        counter(
            &mut e,
            "relay_upstream_decode_errors",
            "Exchange frames that could not be decoded",
            &by_exchange(&|u| u.counters.decode_errors),
        )?;
        counter(
            &mut e,
            "relay_upstream_rejected_requests",
            "Requests the exchange refused",
            &by_exchange(&|u| u.counters.rejected_requests),
        )?;
        counter(
            &mut e,
            "relay_upstream_book_resyncs",
            "Order books rebuilt from a fresh snapshot",
            &by_exchange(&|u| u.counters.resyncs),
        )?;
        counter(
            &mut e,
            "relay_upstream_backfilled_trades",
            "Trades fetched back from the exchange's REST API after an outage",
            &by_exchange(&|u| u.counters.backfilled_trades),
        )?;
        counter(
            &mut e,
            "relay_upstream_incomplete_backfills",
            "Backfills that could not get every trade missed (each is an upstream_outage gap)",
            &by_exchange(&|u| u.counters.backfills_incomplete),
        )?;
        let rest: Vec<(Labels, u64)> = upstreams
            .iter()
            .flat_map(|u| {
                u.rest.iter().map(move |(status, n)| {
                    (
                        vec![
                            ("exchange", u.exchange.to_string()),
                            ("status", status.to_string()),
                        ],
                        *n,
                    )
                })
            })
            .collect();
        counter(&mut e, "relay_upstream_rest_requests", "REST requests to the exchange, by answer (429 and 418: rate limited; error: no answer)", &rest)?;

        let latency: Vec<(Labels, HistogramSnapshot)> = upstreams
            .iter()
            .map(|u| {
                (
                    vec![("exchange", u.exchange.to_string())],
                    self.stats.event_latency(u.exchange),
                )
            })
            .collect();
        histogram(
            &mut e,
            "relay_exchange_to_client",
            "Exchange event time to the frame handed to the clients' sockets",
            &latency,
        )?;
        histogram(
            &mut e,
            "relay_fanout_duration",
            "One fan-out: an event (or a burst) to every subscriber of a feed",
            &[(none(), self.stats.fanout())],
        )?;
        let reconnect: Vec<(Labels, HistogramSnapshot)> = upstreams
            .iter()
            .map(|u| {
                (
                    vec![("exchange", u.exchange.to_string())],
                    u.reconnect.clone(),
                )
            })
            .collect();
        histogram(
            &mut e,
            "relay_upstream_reconnect_duration",
            "From losing an upstream connection to the next one open",
            &reconnect,
        )?;
        if let Some(jwks) = self.auth.current().jwks() {
            let snap = jwks.snapshot();
            gauge(
                &mut e,
                "relay_jwks_keys",
                "Signing keys held from auth.jwks_url",
                None,
                &[(none(), i64::try_from(snap.keys).unwrap_or(i64::MAX))],
            )?;
            gauge(
                &mut e,
                "relay_jwks_loaded",
                "1 once a JWKS fetch has succeeded; 0: tokens cannot be checked yet",
                None,
                &[(none(), i64::from(snap.state == "loaded"))],
            )?;
            counter(
                &mut e,
                "relay_jwks_fetches",
                "JWKS fetches, by outcome",
                &[
                    (
                        vec![("outcome", "ok".to_string())],
                        snap.fetches.saturating_sub(snap.failed_fetches),
                    ),
                    (vec![("outcome", "failed".to_string())], snap.failed_fetches),
                ],
            )?;
        }
        if let Some(cluster) = &self.cluster {
            let snap = cluster.snapshot();
            gauge(
                &mut e,
                "relay_cluster_nodes",
                "Relays of the cluster alive now (as this node last read them from Redis)",
                None,
                &[(none(), snap.nodes as i64)],
            )?;
            gauge(
                &mut e,
                "relay_cluster_redis_connected",
                "1 while this node reaches Redis; 0: degraded, it reads the exchanges itself",
                None,
                &[(none(), i64::from(snap.redis == "connected"))],
            )?;
            let roles: Vec<(Labels, i64)> = ["owner", "follower", "local", "switching"]
                .into_iter()
                .map(|role| {
                    let n = snap.streams.values().filter(|s| s.role == role).count();
                    (vec![("role", role.to_string())], n as i64)
                })
                .collect();
            gauge(
                &mut e,
                "relay_cluster_streams",
                "Streams this node wants, by what it does with each (owner: holds the lease)",
                None,
                &roles,
            )?;
            counter(
                &mut e,
                "relay_cluster_lease_changes",
                "Leases this node took or lost",
                &[(none(), snap.lease_changes)],
            )?;
            counter(
                &mut e,
                "relay_cluster_redis_errors",
                "Redis calls of this node that failed or timed out",
                &[(none(), cluster.redis_errors())],
            )?;
        }
        Ok(())
    }
}
