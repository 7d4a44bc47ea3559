//! The host's pclive settings: `/etc/pclive/config.toml` (or the file `$PCLIVE_CONFIG` names).
//!
//! Whoever may create containers may set annotations (a Kubernetes pod, if the cluster
//! allow-lists them), but the shim acts on them as root. The settings here are the host
//! administrator's answer to what annotations may ask: which host directories their paths may
//! name, and whether a container may listen for a migration at all. A missing file means the
//! defaults below; a file that cannot be parsed is an error (no silent defaults).
//!
//! ```toml
//! [annotations]
//! read_dirs = ["/etc/pclive", "/var/lib/pclive"]   # key files, restore images, CRIU configs
//! write_dirs = ["/var/lib/pclive"]                 # progress files, restore work directories
//! allow_receive = true                             # containers may receive migrations
//! allow_insecure = false                           # ... without a key (never on a shared network)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the settings live unless [`CONFIG_ENV`] says otherwise.
pub const CONFIG_FILE: &str = "/etc/pclive/config.toml";
/// Names another settings file (test beds that run several "hosts" on one machine).
pub const CONFIG_ENV: &str = "PCLIVE_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pclive's settings {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pclive's settings {path} are not valid: {message} (see the README's \"Trust\" section for the keys)")]
    Parse { path: PathBuf, message: String },
}

/// The host's settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub annotations: AnnotationPolicy,
}

/// What annotations may ask of this host.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationPolicy {
    /// Directories under which annotations may name files the shim reads (key files, restore
    /// image directories, CRIU config files).
    pub read_dirs: Vec<PathBuf>,
    /// Directories under which annotations may name files the shim writes (progress files,
    /// restore work directories). The shim's own state directory is always allowed.
    pub write_dirs: Vec<PathBuf>,
    /// Containers may listen for a migration (`…receive.listen`). Off by default: a listener is
    /// a door into the host.
    pub allow_receive: bool,
    /// Containers may receive without a key (`…receive.insecure=true`): anyone who reaches the
    /// port could then make this host restore, as root, whatever they send.
    pub allow_insecure: bool,
}

impl Default for AnnotationPolicy {
    fn default() -> Self {
        AnnotationPolicy {
            read_dirs: vec!["/etc/pclive".into(), "/var/lib/pclive".into()],
            write_dirs: vec!["/var/lib/pclive".into()],
            allow_receive: false,
            allow_insecure: false,
        }
    }
}

impl Config {
    /// The settings file in effect: `$PCLIVE_CONFIG`, else [`CONFIG_FILE`].
    pub fn path() -> PathBuf {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(CONFIG_FILE),
        }
    }

    /// Reads the settings in effect (the defaults if there is no file).
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(&Self::path())
    }

    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.message().to_string())?;
        for dir in config
            .annotations
            .read_dirs
            .iter()
            .chain(&config.annotations.write_dirs)
        {
            if !dir.is_absolute() {
                return Err(format!("{} is not an absolute directory", dir.display()));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_the_safe_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load_from(&dir.path().join("none.toml")).unwrap();
        assert!(!config.annotations.allow_receive && !config.annotations.allow_insecure);
        assert_eq!(
            config.annotations.write_dirs,
            vec![PathBuf::from("/var/lib/pclive")]
        );
    }

    #[test]
    fn settings_are_read_and_mistakes_are_errors() {
        let config =
            Config::parse("[annotations]\nallow_receive = true\nread_dirs = [\"/srv/keys\"]\n")
                .unwrap();
        assert!(config.annotations.allow_receive);
        assert_eq!(
            config.annotations.read_dirs,
            vec![PathBuf::from("/srv/keys")]
        );
        assert_eq!(
            config.annotations.write_dirs,
            AnnotationPolicy::default().write_dirs
        );
        let typo = Config::parse("[annotations]\nallow_recieve = true\n").unwrap_err();
        assert!(typo.contains("allow_recieve"), "{typo}");
        assert!(Config::parse("[annotations]\nread_dirs = [\"keys\"]\n").is_err());
    }
}
