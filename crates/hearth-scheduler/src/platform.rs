//! Platform properties (`exec_properties`): parsing, normalisation and
//! validation. Names follow BuildBuddy's and are matched case-insensitively;
//! values are trimmed. Unknown names are kept (they are part of the runner
//! key) and otherwise ignored.

use std::collections::BTreeMap;

use hearth_proto::reapi;

pub const ISOLATION: &str = "workload-isolation-type";
pub const POOL: &str = "pool";
pub const OS_FAMILY: &str = "osfamily";
pub const ARCH: &str = "arch";

/// Isolation types Hearth knows. Executors advertise the subset they can run.
pub const ISOLATION_TYPES: &[&str] = &["none", "firecracker"];

/// Why a platform can't be honoured; the message names the property and the
/// accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlatformError(pub String);

/// A normalised platform: lowercase names → trimmed values, sorted.
/// `Debug` prints secret values (the registry password) as `<redacted>`,
/// so logging a job, a `RunSpec` or a platform never leaks them.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Platform {
    props: BTreeMap<String, String>,
}

/// Properties whose values are secrets.
const SECRET: &[&str] = &["container-registry-password"];

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<String, String> = self.shown_pairs().into_iter().collect();
        f.debug_struct("Platform").field("props", &shown).finish()
    }
}

impl Platform {
    /// Merges `Command.platform` and `Action.platform` (the Action's wins, as
    /// REAPI 2.2 says) and checks the values Hearth interprets.
    pub fn from_protos(
        command: Option<&reapi::Platform>,
        action: Option<&reapi::Platform>,
    ) -> Result<Self, PlatformError> {
        let mut props = BTreeMap::new();
        for p in command
            .into_iter()
            .chain(action)
            .flat_map(|p| &p.properties)
        {
            let name = p.name.trim().to_ascii_lowercase();
            if name.is_empty() {
                return Err(PlatformError(
                    "a platform property has an empty name".into(),
                ));
            }
            props.insert(name, p.value.trim().to_string());
        }
        let platform = Platform { props };
        platform.validate()?;
        Ok(platform)
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Platform {
            props: pairs
                .into_iter()
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.props
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The properties with secret values replaced by `<redacted>`, fit to
    /// show an operator.
    pub fn shown_pairs(&self) -> Vec<(String, String)> {
        self.props
            .iter()
            .map(|(k, v)| {
                let v = if SECRET.contains(&k.as_str()) {
                    "<redacted>".to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// `workload-isolation-type`, defaulting to `none`.
    pub fn isolation(&self) -> &str {
        match self.get(ISOLATION) {
            None | Some("") => "none",
            Some(v) => v,
        }
    }

    pub fn flag(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn validate(&self) -> Result<(), PlatformError> {
        let iso = self.isolation();
        if !ISOLATION_TYPES.contains(&iso) {
            return Err(PlatformError(format!(
                "{ISOLATION}={iso:?} is not supported; accepted values: {}",
                ISOLATION_TYPES.join(", ")
            )));
        }
        for name in ["recycle-runner", "init-dockerd"] {
            if let Some(v) = self.get(name) {
                if !v.eq_ignore_ascii_case("true") && !v.eq_ignore_ascii_case("false") {
                    return Err(PlatformError(format!(
                        "{name}={v:?} is not a boolean; accepted values: true, false"
                    )));
                }
            }
        }
        if let Some(v) = self.get("network") {
            if !["off", "external"].contains(&v) {
                return Err(PlatformError(format!(
                    "network={v:?} is not supported; accepted values: off, external"
                )));
            }
        }
        if let Some(v) = self.get("estimatedcpu") {
            parse_cpu(v).map_err(|e| PlatformError(format!("EstimatedCPU={v:?}: {e}")))?;
        }
        for name in ["estimatedmemory", "estimatedfreediskbytes"] {
            if let Some(v) = self.get(name) {
                parse_bytes(v).map_err(|e| PlatformError(format!("{name}={v:?}: {e}")))?;
            }
        }
        let user = self.get("container-registry-username").is_some();
        let pass = self.get("container-registry-password").is_some();
        if user != pass {
            return Err(PlatformError(
                "container-registry-username and container-registry-password must be given together".into(),
            ));
        }
        Ok(())
    }
}

/// Parses a CPU count: `2`, `1.5`, or millicores `500m`.
pub fn parse_cpu(v: &str) -> Result<f64, String> {
    let n = if let Some(m) = v.strip_suffix('m') {
        m.parse::<f64>().map(|m| m / 1000.0)
    } else {
        v.parse::<f64>()
    }
    .map_err(|_| "expected a CPU count such as 2, 1.5 or 500m".to_string())?;
    if !(n > 0.0 && n.is_finite()) {
        return Err("CPU count must be positive".into());
    }
    Ok(n)
}

/// Parses a byte size: `4GB`, `512MB`, `1.5GiB`, `1000000`, `64k`.
pub fn parse_bytes(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a size such as 4GB, 512MB or 1000000".to_string())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "ki" | "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mi" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "ti" | "tib" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "unknown unit {u:?}; use B, KB, MB, GB, TB or KiB, MiB, GiB"
            ))
        }
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plat(pairs: &[(&str, &str)]) -> Result<Platform, PlatformError> {
        let p = reapi::Platform {
            properties: pairs
                .iter()
                .map(|(n, v)| reapi::platform::Property {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        };
        Platform::from_protos(Some(&p), None)
    }

    #[test]
    fn names_are_case_insensitive_and_values_trimmed() {
        let p = plat(&[("Workload-Isolation-Type", " firecracker "), ("Pool", "x")]).unwrap();
        assert_eq!(p.isolation(), "firecracker");
        assert_eq!(p.get("POOL"), Some("x"));
    }

    #[test]
    fn unknown_isolation_names_accepted_values() {
        let e = plat(&[("workload-isolation-type", "docker")]).unwrap_err();
        assert!(
            e.0.contains("workload-isolation-type") && e.0.contains("none, firecracker"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_rejected_with_the_property_name() {
        assert!(plat(&[("recycle-runner", "yes")])
            .unwrap_err()
            .0
            .contains("recycle-runner"));
        assert!(plat(&[("network", "on")])
            .unwrap_err()
            .0
            .contains("network"));
        assert!(plat(&[("EstimatedMemory", "lots")])
            .unwrap_err()
            .0
            .contains("estimatedmemory"));
        assert!(plat(&[("container-registry-username", "u")]).is_err());
        assert!(plat(&[("unknown-thing", "whatever")]).is_ok());
    }

    #[test]
    fn sizes_and_cpus_parse() {
        assert_eq!(parse_bytes("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_bytes("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_cpu("500m").unwrap(), 0.5);
        assert_eq!(parse_cpu("2").unwrap(), 2.0);
        assert!(parse_cpu("0").is_err());
    }

    #[test]
    fn action_platform_overrides_command_platform() {
        let c = reapi::Platform {
            properties: vec![reapi::platform::Property {
                name: "Pool".into(),
                value: "a".into(),
            }],
        };
        let a = reapi::Platform {
            properties: vec![reapi::platform::Property {
                name: "pool".into(),
                value: "b".into(),
            }],
        };
        assert_eq!(
            Platform::from_protos(Some(&c), Some(&a))
                .unwrap()
                .get("pool"),
            Some("b")
        );
    }

    #[test]
    fn the_web_view_never_shows_the_registry_password() {
        let p = Platform::from_pairs([
            ("container-registry-username", "ci-bot"),
            ("container-registry-password", "hunter2-secret"),
        ]);
        let shown = p.shown_pairs();
        assert!(
            shown.iter().all(|(_, v)| !v.contains("hunter2")),
            "{shown:?}"
        );
        assert!(shown.contains(&("container-registry-username".into(), "ci-bot".into())));
        assert!(shown.contains(&("container-registry-password".into(), "<redacted>".into())));
    }

    #[test]
    fn debug_never_prints_the_registry_password() {
        let p = Platform::from_pairs([
            ("container-registry-username", "ci-bot"),
            ("container-registry-password", "hunter2-secret"),
            ("OSFamily", "Linux"),
        ]);
        let shown = format!("{p:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("ci-bot"),
            "{shown}"
        );
        assert!(
            shown.contains("linux") || shown.contains("Linux"),
            "{shown}"
        );
    }
}
