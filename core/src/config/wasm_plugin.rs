//! Istio's `WasmPlugin` (extensions.istio.io/v1alpha1): a WebAssembly module (proxy-wasm
//! ABI) run by the proxies of the workloads it selects. Checked here field by field, then
//! resolved per workload as Istio does: a plugin of the root namespace without selector
//! applies to every workload, one of a namespace without selector to that namespace's,
//! one with a `selector` (or `targetRefs` to a Service) to the workloads it picks (in any
//! namespace for the root namespace's). Every plugin that applies runs, ordered by phase,
//! then priority (highest first), then name and namespace.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::security::{SelectorSpec, TargetRefSpec};
use super::sidecar::ROOT_NAMESPACE;
use super::validate::Checker;
use super::{Code, NamespacedName};
use isthmus_proto::discovery as xds;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmPluginSpec {
    pub selector: Option<SelectorSpec>,
    pub target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    /// A file path, `file://`, `http://` or `https://` (`oci://` cannot be fetched here).
    #[serde(default)]
    pub url: String,
    /// Lowercase hex SHA-256 of the module.
    #[serde(default)]
    pub sha256: String,
    /// `IfNotPresent` (default) or `Always`.
    pub image_pull_policy: Option<String>,
    /// For OCI images only.
    pub image_pull_secret: Option<String>,
    pub verification_key: Option<String>,
    /// Handed to the plugin as its configuration (JSON).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<BTreeMap<String, serde_json::Value>>")
    )]
    pub plugin_config: Option<serde_json::Value>,
    /// The root id the module's plugin is registered under.
    pub plugin_name: Option<String>,
    /// `AUTHN`, `AUTHZ`, `STATS`, or `UNSPECIFIED_PHASE` (default).
    pub phase: Option<String>,
    pub priority: Option<i64>,
    /// `FAIL_CLOSE` (default), `FAIL_OPEN` or `FAIL_RELOAD`.
    pub fail_strategy: Option<String>,
    pub vm_config: Option<VmConfigSpec>,
    #[serde(default, rename = "match")]
    pub match_: Vec<TrafficSelectorSpec>,
    /// `HTTP` (default) or `NETWORK`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmConfigSpec {
    #[serde(default)]
    pub env: Vec<EnvVarSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvVarSpec {
    pub name: String,
    #[serde(default)]
    pub value: String,
    /// `INLINE` (default) or `HOST` (the proxy's own environment variable).
    pub value_from: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSelectorSpec {
    /// `CLIENT`, `SERVER`, `CLIENT_AND_SERVER` (default) or `UNDEFINED`.
    pub mode: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortNumberSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortNumberSpec {
    pub number: i64,
}

/// A checked WasmPlugin and whom it applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct WasmPluginScope {
    pub key: NamespacedName,
    pub selector: BTreeMap<String, String>,
    pub services: Vec<NamespacedName>,
    pub plugin: xds::WasmPlugin,
}

/// The order of phases in a proxy's chain.
fn phase_rank(phase: &str) -> u8 {
    match phase {
        "AUTHN" => 0,
        "AUTHZ" => 1,
        "STATS" => 2,
        _ => 3,
    }
}

/// Checks a WasmPlugin; faults are named by field.
pub(super) fn wasm_plugin(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &WasmPluginSpec,
) -> WasmPluginScope {
    let (selector, services) =
        super::security::picked(c, key, &spec.selector, &spec.target_refs, &spec.target_ref);
    check_url(c, &spec.url);
    if !spec.sha256.is_empty()
        && (spec.sha256.len() != 64
            || !spec
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        c.fail(
            Code::InvalidValue,
            "spec.sha256",
            format!(
                "`{}` is not a SHA-256 in lowercase hex (64 digits)",
                spec.sha256
            ),
        );
    }
    let pull_always = match spec.image_pull_policy.as_deref() {
        None | Some("IfNotPresent" | "UNSPECIFIED_POLICY") => false,
        Some("Always") => true,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "spec.imagePullPolicy",
                format!("`{other}` is not IfNotPresent or Always"),
            );
            false
        }
    };
    if spec.image_pull_secret.is_some() {
        c.fail(
            Code::Ignored,
            "spec.imagePullSecret",
            "pull secrets are for OCI images, which Isthmus does not fetch",
        );
    }
    if spec.verification_key.is_some() {
        c.fail(
            Code::Ignored,
            "spec.verificationKey",
            "module signatures are not checked (Istio does not either); pin the module with sha256",
        );
    }
    let phase = match spec.phase.as_deref() {
        None | Some("UNSPECIFIED_PHASE") => "",
        Some(p @ ("AUTHN" | "AUTHZ" | "STATS")) => p,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "spec.phase",
                format!("`{other}` is not AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE"),
            );
            ""
        }
    };
    let priority = match spec.priority.map(i32::try_from) {
        None => 0,
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            c.fail(
                Code::InvalidValue,
                "spec.priority",
                "a priority is a 32-bit integer",
            );
            0
        }
    };
    let fail_open = match spec.fail_strategy.as_deref() {
        None | Some("FAIL_CLOSE" | "FAIL_RELOAD") => false,
        Some("FAIL_OPEN") => true,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "spec.failStrategy",
                format!("`{other}` is not FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD"),
            );
            false
        }
    };
    match spec.type_.as_deref() {
        None | Some("HTTP" | "UNSPECIFIED_PLUGIN_TYPE") => {}
        Some("NETWORK") => c.fail(
            Code::Schema,
            "spec.type",
            "NETWORK (layer 4) plugins are not supported yet; HTTP plugins are",
        ),
        Some(other) => c.fail(
            Code::InvalidValue,
            "spec.type",
            format!("`{other}` is not HTTP or NETWORK"),
        ),
    }
    let mut matches = Vec::new();
    for (i, m) in spec.match_.iter().enumerate() {
        let (client, server) = match m.mode.as_deref() {
            None | Some("UNDEFINED" | "CLIENT_AND_SERVER") => (true, true),
            Some("CLIENT") => (true, false),
            Some("SERVER") => (false, true),
            Some(other) => {
                c.fail(
                    Code::InvalidValue,
                    format!("spec.match[{i}].mode"),
                    format!("`{other}` is not CLIENT, SERVER or CLIENT_AND_SERVER"),
                );
                (true, true)
            }
        };
        let mut ports = Vec::new();
        for (j, p) in m.ports.iter().enumerate() {
            match u16::try_from(p.number).ok().filter(|n| *n > 0) {
                Some(n) => ports.push(u32::from(n)),
                None => c.fail(
                    Code::InvalidValue,
                    format!("spec.match[{i}].ports[{j}].number"),
                    format!("{} is not a port", p.number),
                ),
            }
        }
        matches.push(xds::TrafficMatch {
            client,
            server,
            ports,
        });
    }
    let mut env = BTreeMap::new();
    for (i, e) in spec.vm_config.iter().flat_map(|v| v.env.iter()).enumerate() {
        let field = format!("spec.vmConfig.env[{i}]");
        let value = match e.value_from.as_deref() {
            None | Some("INLINE") => Some(e.value.clone()),
            // The proxy's own variable; absent ones are left out, as Istio does.
            Some("HOST") => std::env::var(&e.name).ok(),
            Some(other) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.valueFrom"),
                    format!("`{other}` is not INLINE or HOST"),
                );
                None
            }
        };
        if e.name.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.name"),
                "a variable needs a name",
            );
        } else if let Some(v) = value {
            env.insert(e.name.clone(), v);
        }
    }
    let plugin_config = spec
        .plugin_config
        .as_ref()
        .map(|v| v.to_string())
        .unwrap_or_default();
    WasmPluginScope {
        key: key.clone(),
        selector,
        services,
        plugin: xds::WasmPlugin {
            name: key.to_string(),
            url: spec.url.clone(),
            sha256: spec.sha256.clone(),
            plugin_name: spec.plugin_name.clone().unwrap_or_default(),
            plugin_config,
            phase: phase.to_owned(),
            priority,
            fail_open,
            r#match: matches,
            pull_always,
            env,
        },
    }
}

/// Where a module can come from: a file, or HTTP(S).
fn check_url(c: &mut Checker<'_>, url: &str) {
    let fault = if url.is_empty() {
        Some("a WasmPlugin names its module's `url`".to_owned())
    } else if url.starts_with("oci://") {
        Some(format!("`{url}`: OCI images cannot be fetched by Isthmus; give a file path, file://, http:// or https:// URL of the .wasm module"))
    } else if let Some(path) = url.strip_prefix("file://") {
        (!path.starts_with('/'))
            .then(|| format!("`{url}`: a file:// URL names an absolute path (file:///...)"))
    } else if url.starts_with("http://") || url.starts_with("https://") {
        url.parse::<http::Uri>()
            .err()
            .map(|e| format!("`{url}` is not a URL: {e}"))
    } else if url.starts_with('/') {
        None
    } else {
        Some(format!("`{url}`: a URL without scheme is an OCI image to Istio, which Isthmus cannot fetch; give a file path, file://, http:// or https:// URL"))
    };
    if let Some(message) = fault {
        c.fail(Code::InvalidValue, "spec.url", message);
    }
}

/// The WasmPlugins that apply to a workload of `namespace` with `labels` serving
/// `services`, in the order its proxy runs them.
pub fn plugins_for(
    set: &super::ConfigSet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    services: &[NamespacedName],
) -> Vec<xds::WasmPlugin> {
    let mut applying: Vec<&WasmPluginScope> = set
        .wasm_plugins
        .values()
        .filter(|p| {
            let ns = p.key.namespace.as_str();
            if !p.services.is_empty() {
                return ns == namespace && p.services.iter().any(|s| services.contains(s));
            }
            let in_scope = ns == namespace || ns == ROOT_NAMESPACE;
            in_scope && super::selects(&p.selector, labels)
        })
        .collect();
    applying.sort_by(|a, b| {
        phase_rank(&a.plugin.phase)
            .cmp(&phase_rank(&b.plugin.phase))
            .then(b.plugin.priority.cmp(&a.plugin.priority))
            .then(a.key.name.cmp(&b.key.name))
            .then(a.key.namespace.cmp(&b.key.namespace))
    });
    applying.into_iter().map(|p| p.plugin.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{load_files, ConfigError, ConfigSet, SourceFile};
    use super::*;

    fn load(yaml: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        load_files(&[SourceFile {
            name: "w.yaml".into(),
            contents: yaml.to_owned(),
        }])
        .map_err(|e| e.0)
    }

    fn plugin(name: &str, ns: &str, spec: &str) -> String {
        format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}---\n")
    }

    fn field(spec: &str) -> String {
        match load(&plugin("p", "demo", spec)) {
            Err(mut e) => e.remove(0).field,
            Ok(set) => set.warnings.first().cloned().expect("a fault").field,
        }
    }

    #[test]
    fn plugins_apply_by_scope_and_run_by_phase_then_priority() {
        let yaml = [
            plugin("stats", "demo", "  url: /p/stats.wasm\n  phase: STATS\n"),
            plugin("late", "demo", "  url: /p/late.wasm\n"),
            plugin("authz-low", "demo", "  url: /p/a.wasm\n  phase: AUTHZ\n  priority: 1\n"),
            plugin("authz-high", "demo", "  url: /p/b.wasm\n  phase: AUTHZ\n  priority: 10\n  selector: {matchLabels: {app: reviews}}\n"),
            plugin("mesh", "istio-system", "  url: file:///p/mesh.wasm\n  phase: AUTHN\n  pluginConfig: {header: x-mesh}\n  failStrategy: FAIL_OPEN\n"),
            plugin("other-ns", "shop", "  url: https://example.com/p.wasm\n"),
        ]
        .concat();
        let set = load(&yaml).expect("valid");
        let labels: BTreeMap<String, String> = [("app".to_owned(), "reviews".to_owned())].into();
        let names = |ps: Vec<xds::WasmPlugin>| ps.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(
            names(plugins_for(&set, "demo", &labels, &[])),
            [
                "istio-system/mesh",
                "demo/authz-high",
                "demo/authz-low",
                "demo/stats",
                "demo/late"
            ]
        );
        assert_eq!(
            names(plugins_for(&set, "demo", &BTreeMap::new(), &[])),
            [
                "istio-system/mesh",
                "demo/authz-low",
                "demo/stats",
                "demo/late"
            ],
            "a selector picks by label"
        );
        let mesh = &plugins_for(&set, "shop", &BTreeMap::new(), &[])[0];
        assert_eq!(mesh.plugin_config, r#"{"header":"x-mesh"}"#);
        assert!(mesh.fail_open);
        assert_eq!(mesh.phase, "AUTHN");
    }

    #[test]
    fn a_target_ref_picks_the_workloads_of_a_service() {
        let set = load(&plugin(
            "p",
            "demo",
            "  url: /p.wasm\n  targetRefs: [{kind: Service, group: \"\", name: reviews}]\n  match: [{mode: SERVER, ports: [{number: 8080}]}]\n",
        ))
        .expect("valid");
        let reviews = NamespacedName::new("demo", "reviews");
        let picked = plugins_for(
            &set,
            "demo",
            &BTreeMap::new(),
            std::slice::from_ref(&reviews),
        );
        assert_eq!(picked.len(), 1);
        assert_eq!(
            picked[0].r#match,
            [xds::TrafficMatch {
                client: false,
                server: true,
                ports: vec![8080]
            }]
        );
        assert!(plugins_for(&set, "demo", &BTreeMap::new(), &[]).is_empty());
    }

    #[test]
    fn bad_plugins_name_their_field() {
        assert_eq!(field("  url: oci://registry/p:1\n"), "spec.url");
        assert_eq!(field("  url: registry/p:1\n"), "spec.url");
        assert_eq!(field("  url: file://relative.wasm\n"), "spec.url");
        assert_eq!(field("  phase: AUTHN\n"), "spec.url");
        assert_eq!(field("  url: /p.wasm\n  sha256: ABC\n"), "spec.sha256");
        assert_eq!(field("  url: /p.wasm\n  phase: LATE\n"), "spec.phase");
        assert_eq!(
            field("  url: /p.wasm\n  failStrategy: RETRY\n"),
            "spec.failStrategy"
        );
        assert_eq!(field("  url: /p.wasm\n  type: NETWORK\n"), "spec.type");
        assert_eq!(
            field("  url: /p.wasm\n  match: [{mode: INBOUND}]\n"),
            "spec.match[0].mode"
        );
        assert_eq!(
            field("  url: /p.wasm\n  match: [{ports: [{number: 70000}]}]\n"),
            "spec.match[0].ports[0].number"
        );
        assert_eq!(
            field("  url: /p.wasm\n  priority: 3000000000\n"),
            "spec.priority"
        );
        assert_eq!(
            field("  url: /p.wasm\n  imagePullPolicy: Never\n"),
            "spec.imagePullPolicy"
        );
        assert_eq!(field("  url: /p.wasm\n  urll: x\n"), "spec.urll");
    }
}
