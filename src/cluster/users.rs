//! Connections per user across the cluster (`server.max_connections_per_user`): each node
//! keeps its own counts in `relay:users:<node>`, and a new connection is counted only if the
//! live nodes' counts together stay under the cap ([`keys::USER_JOIN`]). A node that dies
//! stops counting when its heartbeat lapses; the counts are written whole again when Redis
//! comes back and every [`USER_SYNC_BEATS`] heartbeats, so a decrement lost to a Redis fault
//! does not hold a user back for long.

use super::{keys, Cluster, LEASE};
use crate::domain::UserId;
use crate::protocol::now_millis;

/// Heartbeats between two full writes of this node's user counts (10 s at 0.5 s).
const USER_SYNC_BEATS: u32 = 20;

impl Cluster {
    /// How long this node's counts outlive its last heartbeat.
    fn users_ttl_ms() -> u64 {
        LEASE.as_millis() as u64 * 2
    }

    fn count_user(&self, user: &str, delta: i64) {
        let mut st = self.state();
        let n = st.users.entry(user.to_string()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            st.users.remove(user);
        }
    }

    /// Counts one more connection of `user` if the cluster holds fewer than `limit`:
    /// `Ok(Ok(()))` counted, `Ok(Err(held))` refused, `Err(())` Redis unreachable (counted
    /// here, and written to Redis when it is back).
    pub async fn user_joined(&self, user: &UserId, limit: usize) -> Result<Result<(), usize>, ()> {
        self.count_user(user.as_str(), 1);
        let held: Option<i64> = self
            .eval(
                "count user",
                keys::USER_JOIN
                    .key(keys::NODES)
                    .key(keys::users(&self.node))
                    .arg(user.as_str())
                    .arg(limit)
                    .arg(now_millis())
                    .arg(&*self.node)
                    .arg(Self::users_ttl_ms()),
            )
            .await;
        match held {
            None => Err(()),
            Some(n) if n < 0 => Ok(Ok(())),
            Some(n) => {
                self.count_user(user.as_str(), -1);
                Ok(Err(usize::try_from(n).unwrap_or(usize::MAX)))
            }
        }
    }

    /// One connection of `user` fewer, here and (in the background) in Redis.
    pub fn user_left(&self, user: &UserId) {
        self.count_user(user.as_str(), -1);
        let Some(me) = self.me.upgrade() else { return };
        // A slot dropped while the runtime shuts down has nowhere to run: the node's counts
        // expire with its heartbeat then anyway.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let user = user.to_string();
        runtime.spawn(async move {
            let _: Option<i64> = me
                .eval(
                    "uncount user",
                    keys::USER_LEAVE.key(keys::users(&me.node)).arg(user),
                )
                .await;
        });
    }

    /// From the heartbeat: keeps this node's counts alive in Redis, and writes them whole when
    /// `now` (Redis just came back) or every [`USER_SYNC_BEATS`].
    pub(super) async fn keep_users(&self, now: bool) {
        let (users, due) = {
            let mut st = self.state();
            st.beats_since_user_sync += 1;
            let due = now || st.beats_since_user_sync >= USER_SYNC_BEATS;
            if due {
                st.beats_since_user_sync = 0;
            }
            (st.users.clone(), due)
        };
        let key = keys::users(&self.node);
        let mut p = redis::pipe();
        if due {
            p.atomic().cmd("DEL").arg(&key).ignore();
            for (user, n) in &users {
                p.cmd("HSET").arg(&key).arg(user).arg(*n).ignore();
            }
        } else if users.is_empty() {
            return;
        }
        p.cmd("PEXPIRE")
            .arg(&key)
            .arg(Self::users_ttl_ms())
            .ignore();
        let _: Option<()> = self.pipeline("user counts", &p).await;
    }
}
