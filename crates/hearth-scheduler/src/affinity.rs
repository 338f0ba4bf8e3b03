//! Affinity keys: which warm (recycled) runner an action could reuse. An
//! executor reports the keys of the runners it holds; the scheduler prefers
//! it for actions with `recycle-runner=true` and an equal key. A runner's own
//! key (the VM runner's) starts with this one and adds what only the executor
//! knows (VMM, resolved image, size).

use sha2::{Digest as _, Sha256};

use crate::Platform;

/// Hex SHA-256 over the tenant, the instance name and every platform
/// property, sorted by name (as [`Platform`] keeps them), so the order the
/// client listed them in does not matter. Each string goes in with its length
/// in front: no tenant, instance name, property name or value (any may hold
/// `=` or NUL) can make two different inputs hash alike. A warm runner is
/// thus never handed to another tenant, whatever instance name it claims.
pub fn affinity_key(tenant: &str, instance_name: &str, platform: &Platform) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    put(tenant);
    put(instance_name);
    // Not the registry password: runner keys are reported and compared, and
    // need not carry even a hash of it. Access to the image is checked with
    // each action's own credentials before any runner is chosen.
    for (name, value) in platform
        .iter()
        .filter(|(n, _)| *n != "container-registry-password")
    {
        put(name);
        put(value);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(instance: &str, pairs: &[(&str, &str)]) -> String {
        affinity_key("", instance, &Platform::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn is_hex_sha256_and_ignores_property_order() {
        let k = key("main", &[("recycle-runner", "true"), ("OSFamily", "Linux")]);
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            k,
            key("main", &[("osfamily", "Linux"), ("recycle-runner", "true")]),
            "order and name case do not matter"
        );
    }

    #[test]
    fn differs_between_instances_and_properties() {
        let base = key("a", &[("recycle-runner", "true"), ("pool", "x")]);
        let others = [
            key("b", &[("recycle-runner", "true"), ("pool", "x")]),
            key("", &[("recycle-runner", "true"), ("pool", "x")]),
            key("a", &[("recycle-runner", "true"), ("pool", "y")]),
            key(
                "a",
                &[("recycle-runner", "true"), ("pool", "x"), ("arch", "")],
            ),
            key("a", &[("recycle-runner", "true")]),
        ];
        for k in others {
            assert_ne!(base, k);
        }
    }

    #[test]
    fn leaves_the_registry_password_out() {
        let with = |p: &str| {
            key(
                "",
                &[
                    ("recycle-runner", "true"),
                    ("container-registry-username", "u"),
                    ("container-registry-password", p),
                ],
            )
        };
        assert_eq!(with("hunter2"), with("other"));
    }

    #[test]
    fn differs_between_tenants() {
        let p = Platform::from_pairs([("recycle-runner", "true")]);
        assert_ne!(
            affinity_key("team-a", "", &p),
            affinity_key("team-b", "", &p)
        );
        assert_ne!(affinity_key("ab", "", &p), affinity_key("a", "b", &p));
    }

    #[test]
    fn separators_inside_strings_cannot_collide() {
        assert_ne!(key("", &[("a=b", "c")]), key("", &[("a", "b=c")]));
        assert_ne!(key("i\0a=b\0", &[]), key("i", &[("a", "b")]));
        assert_ne!(
            key("", &[("a", "b\0c=d")]),
            key("", &[("a", "b"), ("c", "d")])
        );
    }
}
