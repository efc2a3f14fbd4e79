//! Configuration loading shared by the Otherix daemons: a YAML file read as a
//! tree, `OTHERIX_<SECTION>__<KEY>=value` environment overrides (`__`
//! separates nested keys, values are read as YAML so numbers, booleans and
//! `[a, b]` lists work), and deserialisation whose errors name the dotted key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The prefix of every environment override.
pub const ENV_PREFIX: &str = "OTHERIX_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML, or its top level is not a mapping.
    #[error("config file {} is not valid YAML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key is unknown or has a value of the wrong type or range.
    #[error("invalid config key {key}: {message}")]
    Key {
        /// The dotted key, e.g. `server.listen`, or the environment variable.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// A key error.
    pub fn key(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key { key: key.to_owned(), message: message.into() }
    }
}

/// Reads a YAML file as a tree (an empty file is an empty mapping).
pub fn read_tree(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_tree(&text).map_err(|message| ConfigError::Syntax { path: path.to_owned(), message })
}

/// Parses YAML text as a tree (an empty document is an empty mapping); the
/// error is the parser's message.
pub fn parse_tree(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match yaml_serde::from_str::<Value>(text).map_err(|e| e.to_string())? {
        Value::Null => Ok(Value::Object(Map::new())),
        v @ Value::Object(_) => Ok(v),
        _ => Err("the top level must be a mapping".to_owned()),
    }
}

/// Sets the value at a key path, creating the mappings on the way.
pub fn set_key(tree: &mut Value, path: &[&str], value: Value) -> Result<(), ConfigError> {
    let dotted = path.join(".");
    let Some((last, parents)) = path.split_last() else { return Err(ConfigError::key("(top level)", "empty key")) };
    let mut node = tree;
    for seg in parents {
        let obj =
            node.as_object_mut().ok_or_else(|| ConfigError::key(&dotted, "overrides a key that is not a mapping"))?;
        node = obj.entry((*seg).to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
    }
    let obj = node.as_object_mut().ok_or_else(|| ConfigError::key(&dotted, "overrides a key that is not a mapping"))?;
    obj.insert((*last).to_owned(), value);
    Ok(())
}

/// Which `OTHERIX_` variables are a daemon's configuration: those whose first
/// segment names one of its sections. Other `OTHERIX_` variables (the CLI's,
/// bootstrap secrets, the other daemon's) are left alone.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    /// Top-level sections the overrides may address.
    pub sections: Vec<String>,
    /// Sections whose values are always strings (never read as YAML), e.g.
    /// a join token that could look like a number.
    pub string_sections: Vec<String>,
}

impl Overlay {
    /// An overlay over these sections.
    pub fn new(sections: impl IntoIterator<Item = impl Into<String>>) -> Overlay {
        Overlay { sections: sections.into_iter().map(Into::into).collect(), string_sections: Vec::new() }
    }

    /// The sections are the top-level keys of `defaults` serialised.
    pub fn of_defaults<T: serde::Serialize>(defaults: &T) -> Overlay {
        let sections = match serde_json::to_value(defaults) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        Overlay { sections, string_sections: Vec::new() }
    }

    /// Marks sections whose values stay strings.
    pub fn with_string_sections(mut self, sections: &[&str]) -> Overlay {
        self.string_sections = sections.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Applies the overrides in `env` to `tree`, in name order.
    pub fn apply(&self, tree: &mut Value, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        vars.sort();
        for (name, raw) in vars {
            let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            if !self.sections.contains(&path[0]) {
                continue;
            }
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::key(&name, "empty key segment"));
            }
            let value = if self.string_sections.contains(&path[0]) || raw.is_empty() {
                Value::String(raw)
            } else {
                yaml_serde::from_str(&raw).unwrap_or(Value::String(raw))
            };
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            set_key(tree, &segs, value).map_err(|e| match e {
                ConfigError::Key { message, .. } => ConfigError::key(&name, message),
                other => other,
            })?;
        }
        Ok(())
    }
}

/// Deserialises a tree; an error names the dotted key it is about.
pub fn deserialize<T: DeserializeOwned>(tree: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::key(if key == "." { "(top level)" } else { &key }, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Server {
        listen: String,
        workers: u32,
    }

    #[derive(Debug, serde::Deserialize, serde::Serialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        server: Server,
        token: Token,
    }

    #[derive(Debug, serde::Deserialize, serde::Serialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Token {
        value: String,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn overrides_nest_and_foreign_variables_are_ignored() {
        let mut tree = parse_tree("server:\n  listen: a\n").unwrap();
        Overlay::of_defaults(&Cfg::default())
            .with_string_sections(&["token"])
            .apply(
                &mut tree,
                env(&[
                    ("OTHERIX_SERVER__WORKERS", "4"),
                    ("OTHERIX_TOKEN__VALUE", "123"),
                    ("OTHERIX_API_TOKEN", "not-config"),
                    ("OTHER_SERVER__LISTEN", "x"),
                ]),
            )
            .unwrap();
        let cfg: Cfg = deserialize(tree).unwrap();
        assert_eq!(cfg.server, Server { listen: "a".into(), workers: 4 });
        assert_eq!(cfg.token.value, "123");
    }

    #[test]
    fn errors_name_the_key() {
        let tree = parse_tree("server:\n  workers: many\n").unwrap();
        let err = deserialize::<Cfg>(tree).unwrap_err().to_string();
        assert!(err.starts_with("invalid config key server.workers:"), "{err}");
        let mut tree = parse_tree("server: 3\n").unwrap();
        let err = Overlay::new(["server"]).apply(&mut tree, env(&[("OTHERIX_SERVER__LISTEN", "x")])).unwrap_err();
        assert!(err.to_string().contains("OTHERIX_SERVER__LISTEN"), "{err}");
        let err = Overlay::new(["server"]).apply(&mut tree, env(&[("OTHERIX_SERVER____X", "x")])).unwrap_err();
        assert!(err.to_string().contains("empty key segment"), "{err}");
        assert!(parse_tree("- a\n").is_err());
        assert_eq!(parse_tree("").unwrap(), Value::Object(Map::new()));
    }
}
