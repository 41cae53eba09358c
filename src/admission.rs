//! Who may connect, before any session exists: per-address connection caps,
//! handshake rates, failure counting with temporary bans, per-user caps and
//! the per-user message rate shared by a user's connections.
//!
//! Addresses are keyed by IPv4 address or IPv6 /64 (one subscriber's usual
//! allocation). Every table is bounded; when the address table is full of
//! live entries, new addresses are refused with 503 rather than tracked
//! loosely.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::config::{BansConfig, LimitsConfig, parse_net};
use crate::refusal::Refusal;
use crate::sync::{lock, rate_clock};

/// An address as the tables key it: IPv4 as is (IPv4-mapped IPv6 unmapped),
/// IPv6 cut to its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn quota(rate: u32, burst: u32) -> Quota {
    // Validation keeps both at least 1.
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

struct AddressEntry {
    connections: usize,
    handshakes: DefaultDirectRateLimiter,
    failures: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
    last_seen: Instant,
}

/// Per-address admission state.
pub struct AddressGuard {
    entries: Mutex<HashMap<IpAddr, AddressEntry>>,
    max_connections: usize,
    handshake_quota: Quota,
    /// How long an idle entry must rest before its bucket is full again.
    refill: Duration,
    bans: BansConfig,
    allow: Vec<IpNet>,
}

/// One connection counted against its address; released on drop.
pub struct AddressSlot {
    guard: Arc<AddressGuard>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(entry) = lock(&self.guard.entries).get_mut(&self.key) {
            entry.connections = entry.connections.saturating_sub(1);
            entry.last_seen = Instant::now();
        }
    }
}

impl AddressGuard {
    pub fn new(limits: &LimitsConfig, bans: &BansConfig) -> Self {
        let refill_secs = (limits.handshake_burst_per_ip as u64)
            .div_ceil(limits.handshake_rate_per_ip.max(1) as u64);
        Self {
            entries: Mutex::new(HashMap::new()),
            max_connections: limits.max_connections_per_ip,
            handshake_quota: quota(limits.handshake_rate_per_ip, limits.handshake_burst_per_ip),
            refill: Duration::from_secs(refill_secs.max(1)),
            allow: bans
                .allow
                .iter()
                .filter_map(|n| parse_net(n).ok())
                .collect(),
            bans: bans.clone(),
        }
    }

    fn new_entry(&self, now: Instant) -> AddressEntry {
        AddressEntry {
            connections: 0,
            handshakes: RateLimiter::direct_with_clock(self.handshake_quota, rate_clock()),
            failures: 0,
            window_start: now,
            banned_until: None,
            last_seen: now,
        }
    }

    /// Drops entries that hold nothing worth keeping: no connection, no ban,
    /// no failures in the window, a full handshake bucket.
    fn prune(&self, entries: &mut HashMap<IpAddr, AddressEntry>, now: Instant) {
        let window = Duration::from_secs(self.bans.window_secs);
        entries.retain(|_, e| {
            e.connections > 0
                || e.banned_until.is_some_and(|until| until > now)
                || (e.failures > 0 && now.duration_since(e.window_start) < window)
                || now.duration_since(e.last_seen) < self.refill
        });
    }

    /// Whether `ip` is banned now (an expired ban is lifted).
    fn banned(entry: &mut AddressEntry, now: Instant) -> bool {
        match entry.banned_until {
            Some(until) if until > now => true,
            Some(_) => {
                entry.banned_until = None;
                entry.failures = 0;
                entry.window_start = now;
                false
            }
            None => false,
        }
    }

    /// The entry of `key`, created if the table has room (after pruning);
    /// `None` when the table is full of entries worth keeping.
    fn entry<'a>(
        &self,
        entries: &'a mut HashMap<IpAddr, AddressEntry>,
        key: IpAddr,
        now: Instant,
    ) -> Option<&'a mut AddressEntry> {
        if !entries.contains_key(&key) && entries.len() >= self.bans.max_tracked {
            self.prune(entries, now);
            if entries.len() >= self.bans.max_tracked {
                warn!(event = "admission.table_full", tracked = entries.len());
                return None;
            }
        }
        let entry = entries.entry(key).or_insert_with(|| self.new_entry(now));
        entry.last_seen = now;
        Some(entry)
    }

    /// Admits one connection from `ip`: not banned, within the handshake
    /// rate, under the per-address cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, Refusal> {
        let key = address_key(ip);
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        let entry = self
            .entry(&mut entries, key, now)
            .ok_or(Refusal::OverCapacity)?;
        if Self::banned(entry, now) {
            return Err(Refusal::RateLimited);
        }
        if entry.handshakes.check().is_err() {
            return Err(Refusal::RateLimited);
        }
        if entry.connections >= self.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        entry.connections += 1;
        Ok(AddressSlot {
            guard: self.clone(),
            key,
        })
    }

    /// Spends one handshake of `ip`'s rate for a further upgrade on a
    /// connection already admitted (the streams of one HTTP/2
    /// connection): refused when banned or over the rate, and counted
    /// against no connection cap.
    pub fn spend_handshake(&self, ip: IpAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        let entry = self
            .entry(&mut entries, address_key(ip), now)
            .ok_or(Refusal::OverCapacity)?;
        if Self::banned(entry, now) || entry.handshakes.check().is_err() {
            return Err(Refusal::RateLimited);
        }
        Ok(())
    }

    /// Whether `ip` is banned now, without counting anything.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        lock(&self.entries)
            .get_mut(&address_key(ip))
            .is_some_and(|entry| Self::banned(entry, now))
    }

    /// Counts a failed handshake from `ip`; enough of them within the window
    /// ban the address for `bans.ban_secs`. The ban is logged once.
    pub fn record_failure(&self, ip: IpAddr, reason: &'static str) {
        if !self.bans.enabled || self.allow.iter().any(|net| net.contains(&ip)) {
            return;
        }
        let key = address_key(ip);
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        let Some(entry) = self.entry(&mut entries, key, now) else {
            return;
        };
        if Self::banned(entry, now) {
            return;
        }
        if now.duration_since(entry.window_start) > Duration::from_secs(self.bans.window_secs) {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures += 1;
        if entry.failures >= self.bans.max_failures {
            entry.banned_until = Some(now + Duration::from_secs(self.bans.ban_secs));
            metrics::counter!("securechat_bans_total").increment(1);
            info!(
                target: crate::telemetry::AUDIT_TARGET,
                event = "ban.added",
                address = %key,
                reason,
                failures = entry.failures,
                ban_secs = self.bans.ban_secs,
                "address banned after repeated handshake failures"
            );
        }
    }

    /// Addresses banned right now.
    pub fn active_bans(&self) -> usize {
        let now = Instant::now();
        lock(&self.entries)
            .values()
            .filter(|e| e.banned_until.is_some_and(|until| until > now))
            .count()
    }
}

/// The client address of a request that arrived from `peer`: the peer
/// itself, or, when the peer is a trusted proxy, the nearest address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',').map(str::trim) {
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()));
        let Ok(ip) = parsed else {
            // Garbage: stop at the last hop a trusted proxy vouched for.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

struct UserEntry {
    connections: usize,
    limiter: Arc<DefaultDirectRateLimiter>,
}

/// Per-user connection counts and the message-rate bucket a user's
/// connections share. An entry lives while the user has a connection, so
/// the table is bounded by the connection cap.
pub struct Users {
    entries: Mutex<HashMap<String, UserEntry>>,
    max_connections: usize,
    quota: Quota,
}

/// One connection of a user; released on drop.
pub struct UserSlot {
    users: Arc<Users>,
    sub: String,
    /// The user's message-rate bucket, shared by all their connections.
    pub limiter: Arc<DefaultDirectRateLimiter>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut entries = lock(&self.users.entries);
        if let Some(entry) = entries.get_mut(&self.sub) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entries.remove(&self.sub);
            }
        }
    }
}

impl Users {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_connections: limits.max_connections_per_user,
            quota: quota(limits.user_rate_per_sec, limits.user_burst),
        }
    }

    /// Counts a connection of `sub`, refused past the per-user cap.
    pub fn admit(self: &Arc<Self>, sub: &str) -> Result<UserSlot, Refusal> {
        let mut entries = lock(&self.entries);
        let entry = entries.entry(sub.to_owned()).or_insert_with(|| UserEntry {
            connections: 0,
            limiter: Arc::new(RateLimiter::direct_with_clock(self.quota, rate_clock())),
        });
        if entry.connections >= self.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        entry.connections += 1;
        Ok(UserSlot {
            users: self.clone(),
            sub: sub.to_owned(),
            limiter: entry.limiter.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(edit: impl FnOnce(&mut LimitsConfig, &mut BansConfig)) -> Arc<AddressGuard> {
        let mut limits = LimitsConfig::default();
        let mut bans = BansConfig::default();
        edit(&mut limits, &mut bans);
        Arc::new(AddressGuard::new(&limits, &bans))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_cap_and_release() {
        let g = guard(|l, _| l.max_connections_per_ip = 2);
        let a = g.admit(ip("192.0.2.1")).unwrap();
        let _b = g.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            g.admit(ip("192.0.2.1")).err(),
            Some(Refusal::TooManyConnections)
        );
        assert!(g.admit(ip("192.0.2.2")).is_ok());
        drop(a);
        assert!(g.admit(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn ipv6_is_keyed_by_its_64() {
        let g = guard(|l, _| l.max_connections_per_ip = 1);
        let _a = g.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(g.admit(ip("2001:db8:1:2::ffff")).is_err());
        assert!(g.admit(ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(address_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn handshake_rate() {
        let g = guard(|l, _| {
            l.handshake_rate_per_ip = 1;
            l.handshake_burst_per_ip = 3;
        });
        for _ in 0..3 {
            drop(g.admit(ip("192.0.2.1")).unwrap());
        }
        assert_eq!(g.admit(ip("192.0.2.1")).err(), Some(Refusal::RateLimited));
    }

    #[test]
    fn bans_after_failures_except_allowed() {
        let g = guard(|_, b| {
            b.max_failures = 3;
            b.allow = vec!["10.0.0.0/8".into()];
        });
        for _ in 0..3 {
            g.record_failure(ip("192.0.2.9"), "invalid_token");
            g.record_failure(ip("10.1.2.3"), "invalid_token");
        }
        assert!(g.is_banned(ip("192.0.2.9")));
        assert_eq!(g.admit(ip("192.0.2.9")).err(), Some(Refusal::RateLimited));
        assert!(!g.is_banned(ip("10.1.2.3")));
        assert_eq!(g.active_bans(), 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let g = guard(|_, b| b.max_tracked = 16);
        let slots: Vec<_> = (0..16)
            .map(|i| g.admit(ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        assert_eq!(
            g.admit(ip("198.51.100.1")).err(),
            Some(Refusal::OverCapacity)
        );
        drop(slots);
        // Released entries still hold their handshake buckets until refilled,
        // so the table stays full for now; failures are not tracked past it.
        g.record_failure(ip("198.51.100.2"), "invalid_token");
        assert!(lock(&g.entries).len() <= 16);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted = vec![parse_net("10.0.0.0/8").unwrap()];
        let proxy = ip("10.0.0.5");
        assert_eq!(
            client_address(proxy, Some("203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        // The nearest untrusted hop wins; a forged left part does not.
        assert_eq!(
            client_address(proxy, Some("6.6.6.6, 203.0.113.9, 10.0.0.7"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("198.51.100.1"), Some("203.0.113.9"), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(client_address(proxy, Some("garbage"), &trusted), proxy);
        assert_eq!(client_address(proxy, None, &trusted), proxy);
    }

    #[test]
    fn users_cap_and_shared_bucket() {
        let limits = LimitsConfig {
            max_connections_per_user: 2,
            ..Default::default()
        };
        let users = Arc::new(Users::new(&limits));
        let a = users.admit("alice").unwrap();
        let b = users.admit("alice").unwrap();
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        assert_eq!(
            users.admit("alice").err(),
            Some(Refusal::TooManyConnections)
        );
        drop((a, b));
        assert!(lock(&users.entries).is_empty());
    }
}
