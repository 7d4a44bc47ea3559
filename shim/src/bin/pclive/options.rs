//! What `migrate` and `receive` share: option parsing and containerd's address and namespace.

/// Options shared by migrate and receive.
pub struct Common {
    pub address: String,
    pub namespace: String,
}

/// Splits `args` into positional arguments and `--flag value` / `--switch` options.
pub fn parse_options(
    args: &[String],
    switches: &[&str],
) -> Result<(Vec<String>, std::collections::HashMap<String, String>), String> {
    let mut positional = Vec::new();
    let mut options = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(name) = arg.strip_prefix("--") {
            if switches.contains(&name) {
                options.insert(name.to_string(), "true".to_string());
            } else {
                let value = it.next().ok_or(format!("--{name} needs a value"))?;
                options.insert(name.to_string(), value.clone());
            }
        } else {
            positional.push(arg.clone());
        }
    }
    Ok((positional, options))
}

pub fn common(options: &std::collections::HashMap<String, String>) -> Common {
    Common {
        address: options
            .get("address")
            .cloned()
            .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
        namespace: options
            .get("namespace")
            .cloned()
            .unwrap_or_else(|| "default".into()),
    }
}
