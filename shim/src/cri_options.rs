//! `runtimeoptions.v1.Options`: what containerd's CRI plugin sends as task options to a runtime
//! other than runc (a Kubernetes RuntimeClass handler such as `pclive`). It carries the
//! runtime's `options` section of containerd's configuration as a TOML body, or the path of a
//! TOML file (containerd api/types/runtimeoptions/v1/api.proto). pclive reads the same keys as
//! runc's options (`BinaryName`, `SystemdCgroup`, ...); a key it does not know is refused by
//! name rather than ignored.

use std::fs;

use serde::Deserialize;

use crate::task::RuntimeOptions;

/// The type name of the Any that carries it.
pub const CRI_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

#[derive(Clone, PartialEq, prost::Message)]
pub struct CriOptions {
    /// The type of the TOML's content (empty, or runc's options type).
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(string, tag = "2")]
    pub config_path: String,
    #[prost(bytes = "vec", tag = "3")]
    pub config_body: Vec<u8>,
}

/// The keys of containerd's runc options that pclive honours.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RuncOptionsToml {
    binary_name: Option<String>,
    root: Option<String>,
    no_pivot_root: Option<bool>,
    no_new_keyring: Option<bool>,
    systemd_cgroup: Option<bool>,
    criu_image_path: Option<String>,
    criu_work_path: Option<String>,
}

/// The runtime options in `bytes` (an encoded [`CriOptions`]).
pub fn parse(bytes: &[u8]) -> Result<RuntimeOptions, String> {
    let o = <CriOptions as prost::Message>::decode(bytes)
        .map_err(|e| format!("corrupt {CRI_OPTIONS_TYPE}: {e}"))?;
    let inner = o.type_url.rsplit('/').next().unwrap_or("");
    let runc = [
        "containerd.runc.v1.Options",
        "io.containerd.runc.v1.Options",
    ];
    if !inner.is_empty() && !runc.contains(&inner) {
        return Err(format!(
            "{CRI_OPTIONS_TYPE} of type '{}': pclive reads runc's options (containerd.runc.v1.Options) from the runtime's options section",
            o.type_url
        ));
    }
    let (what, text) = if !o.config_path.is_empty() {
        let text = fs::read_to_string(&o.config_path).map_err(|e| {
            format!(
                "cannot read the runtime's config_path {}: {e}",
                o.config_path
            )
        })?;
        (o.config_path.clone(), text)
    } else {
        let text = String::from_utf8(o.config_body)
            .map_err(|_| "the runtime's options section is not UTF-8 TOML".to_string())?;
        ("the runtime's options section".to_string(), text)
    };
    let toml: RuncOptionsToml = toml::from_str(&text).map_err(|e| {
        format!(
            "{what}: {} (pclive honours BinaryName, Root, NoPivotRoot, NoNewKeyring, SystemdCgroup, CriuImagePath, CriuWorkPath)",
            e.message()
        )
    })?;
    Ok(RuntimeOptions {
        binary_name: toml.binary_name.filter(|s| !s.is_empty()),
        root: toml.root.filter(|s| !s.is_empty()),
        no_pivot_root: toml.no_pivot_root.unwrap_or(false),
        no_new_keyring: toml.no_new_keyring.unwrap_or(false),
        systemd_cgroup: toml.systemd_cgroup.unwrap_or(false),
        criu_image_path: toml.criu_image_path.filter(|s| !s.is_empty()),
        criu_work_path: toml.criu_work_path.filter(|s| !s.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn encoded(type_url: &str, path: &str, body: &str) -> Vec<u8> {
        CriOptions {
            type_url: type_url.into(),
            config_path: path.into(),
            config_body: body.as_bytes().to_vec(),
        }
        .encode_to_vec()
    }

    #[test]
    fn reads_runc_keys_from_the_body_or_the_config_path() {
        let o = parse(&encoded(
            "",
            "",
            "BinaryName = \"/usr/sbin/runc\"\nSystemdCgroup = true\n",
        ))
        .unwrap();
        assert_eq!(o.binary_name.as_deref(), Some("/usr/sbin/runc"));
        assert!(o.systemd_cgroup && !o.no_pivot_root);
        // An empty message (CRI with no options section) is the defaults.
        let o = parse(&encoded("", "", "")).unwrap();
        assert!(o.binary_name.is_none() && !o.systemd_cgroup);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pclive.toml");
        fs::write(&file, "NoPivotRoot = true\n").unwrap();
        let o = parse(&encoded(
            "io.containerd.runc.v1.Options",
            file.to_str().unwrap(),
            "",
        ))
        .unwrap();
        assert!(o.no_pivot_root);
    }

    #[test]
    fn unknown_keys_other_types_and_missing_files_are_refused_by_name() {
        let err = parse(&encoded("", "", "SystemdCgroups = true\n")).unwrap_err();
        assert!(err.contains("SystemdCgroups"), "{err}");
        let err = parse(&encoded("gvisor.v1.Options", "", "")).unwrap_err();
        assert!(err.contains("gvisor.v1.Options"), "{err}");
        let err = parse(&encoded("", "/nonexistent/pclive.toml", "")).unwrap_err();
        assert!(err.contains("/nonexistent/pclive.toml"), "{err}");
        assert!(parse(b"\xff\xff").unwrap_err().contains("corrupt"));
    }
}
