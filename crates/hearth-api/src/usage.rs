//! Action-cache use by tenant (for the web view's cache page) and the
//! lookup counters of `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::counter;

/// One tenant's action-cache traffic since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub hits: u64,
    pub misses: u64,
    pub writes: u64,
}

/// Counts by tenant. Tenants are the keys file's (or the one anonymous
/// tenant), so the map is as small as that file.
#[derive(Default)]
pub struct CacheUsage {
    by_tenant: Mutex<HashMap<String, TenantUsage>>,
}

impl CacheUsage {
    fn with(&self, tenant: &str, f: impl FnOnce(&mut TenantUsage)) {
        let mut map = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(tenant) {
            Some(u) => f(u),
            None => f(map.entry(tenant.to_string()).or_default()),
        }
    }

    /// A lookup (GetActionResult, or Execute's) found a usable result or not.
    pub fn lookup(&self, tenant: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        counter!("hearth_action_cache_lookups_total", "result" => result).increment(1);
        self.with(tenant, |u| if hit { u.hits += 1 } else { u.misses += 1 });
    }

    /// A result was stored (UpdateActionResult, or an executed action's).
    pub fn write(&self, tenant: &str) {
        counter!("hearth_action_cache_writes_total").increment(1);
        self.with(tenant, |u| u.writes += 1);
    }

    /// Tenants by lookups, busiest first; given a tenant, that one only.
    pub fn top(&self, tenant: Option<&str>, n: usize) -> Vec<(String, TenantUsage)> {
        let map = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, TenantUsage)> = map
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|want| want == t.as_str()))
            .map(|(t, u)| (t.clone(), *u))
            .collect();
        all.sort_by_key(|(t, u)| (std::cmp::Reverse(u.hits + u.misses), t.clone()));
        all.truncate(n);
        all
    }

    /// Hits and lookups over all tenants (or one).
    pub fn totals(&self, tenant: Option<&str>) -> TenantUsage {
        self.top(tenant, usize::MAX)
            .into_iter()
            .fold(TenantUsage::default(), |a, (_, u)| TenantUsage {
                hits: a.hits + u.hits,
                misses: a.misses + u.misses,
                writes: a.writes + u.writes,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_tenant_and_ranks_the_busiest_first() {
        let u = CacheUsage::default();
        u.lookup("a", true);
        u.lookup("b", true);
        u.lookup("b", false);
        u.write("b");
        let top = u.top(None, 10);
        assert_eq!(top[0].0, "b");
        assert_eq!(
            top[0].1,
            TenantUsage {
                hits: 1,
                misses: 1,
                writes: 1
            }
        );
        assert_eq!(u.top(Some("a"), 10).len(), 1, "a sees itself only");
        assert_eq!(u.totals(None).hits, 2);
    }
}
