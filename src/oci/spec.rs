//! The bundle's `config.json`: what the wrapper reads (the container's user namespace
//! mappings, the root, the mounts that ask for an idmap) and the rewrite it hands to the real
//! runtime. The document is kept as JSON values, so fields this code does not know (newer
//! spec versions, annotations, hooks) pass through untouched.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Error;
use crate::idmap::IdMapping;

/// A bind mount that asks for an idmap (OCI `uidMappings`/`gidMappings`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdmapMount {
    /// Its index in `mounts`.
    pub index: usize,
    pub source: PathBuf,
    pub destination: String,
    pub mapping: IdMapping,
    pub read_only: bool,
}

#[derive(Clone, Debug)]
pub struct Spec {
    value: Value,
    path: PathBuf,
}

impl Spec {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read(path).map_err(|source| Error::Io {
            what: "cannot read the container's config",
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_slice(&text).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !value.is_object() {
            return Err(Error::BadConfig {
                path: path.to_path_buf(),
                reason: "not a JSON object".into(),
            });
        }
        Ok(Self {
            value,
            path: path.to_path_buf(),
        })
    }

    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::BadConfig {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The container's user namespace map (on-disk id = `containerID`, host id = `hostID`),
    /// when it gets a new user namespace with mappings; None when it has none or joins an
    /// existing one (whose mappings the config does not say).
    pub fn user_mapping(&self) -> Result<Option<IdMapping>, Error> {
        let linux = &self.value["linux"];
        let new_userns = linux["namespaces"].as_array().is_some_and(|ns| {
            ns.iter()
                .any(|n| n["type"] == "user" && n["path"].as_str().is_none_or(str::is_empty))
        });
        if !new_userns {
            return Ok(None);
        }
        self.mapping_of(linux, "linux")
    }

    /// `uidMappings` and `gidMappings` of `obj` as one map; None when neither is there.
    fn mapping_of(&self, obj: &Value, what: &str) -> Result<Option<IdMapping>, Error> {
        let ranges = |key: &str| -> Result<Option<String>, Error> {
            let Some(list) = obj.get(key) else {
                return Ok(None);
            };
            let list = list
                .as_array()
                .ok_or_else(|| self.bad(format!("{what}.{key} is not a list")))?;
            let mut parts = Vec::new();
            for m in list {
                let field = |f: &str| {
                    m[f].as_u64()
                        .filter(|&v| v <= u64::from(u32::MAX))
                        .ok_or_else(|| self.bad(format!("{what}.{key}: {f} missing or not a u32")))
                };
                parts.push(format!(
                    "{}:{}:{}",
                    field("containerID")?,
                    field("hostID")?,
                    field("size")?
                ));
            }
            Ok(Some(parts.join(",")))
        };
        match (ranges("uidMappings")?, ranges("gidMappings")?) {
            (None, None) => Ok(None),
            (Some(u), Some(g)) if !u.is_empty() && !g.is_empty() => {
                IdMapping::parse_separate(&u, &g)
                    .map(Some)
                    .map_err(|e| self.bad(format!("{what}: {e}")))
            }
            _ => Err(self.bad(format!(
                "{what} has uidMappings or gidMappings but not both; give both"
            ))),
        }
    }

    /// `root.path`, relative to the bundle when not absolute.
    pub fn root_path(&self, bundle: &Path) -> Result<PathBuf, Error> {
        let p = self.value["root"]["path"]
            .as_str()
            .ok_or_else(|| self.bad("root.path is missing"))?;
        Ok(bundle.join(p))
    }

    /// `root.readonly`.
    pub fn root_read_only(&self) -> bool {
        self.value["root"]["readonly"] == true
    }

    pub fn set_root_path(&mut self, path: &Path) {
        self.value["root"]["path"] = Value::String(path.to_string_lossy().into_owned());
    }

    fn mounts(&self) -> &[Value] {
        self.value["mounts"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The bind mounts that ask for an idmap.
    pub fn idmap_mounts(&self, bundle: &Path) -> Result<Vec<IdmapMount>, Error> {
        let mut out = Vec::new();
        for (index, m) in self.mounts().iter().enumerate() {
            let dest = m["destination"].as_str().unwrap_or_default().to_string();
            let Some(mapping) = self.mapping_of(m, &format!("mount {dest}"))? else {
                continue;
            };
            let opts = options(m);
            let bind = m["type"] == "bind" || opts.iter().any(|o| o == "bind" || o == "rbind");
            if !bind {
                // A new file system (tmpfs with an idmap) is the runtime's to make.
                continue;
            }
            let source = m["source"]
                .as_str()
                .ok_or_else(|| self.bad(format!("mount {dest}: no source")))?;
            out.push(IdmapMount {
                index,
                source: bundle.join(source),
                destination: dest,
                mapping,
                read_only: opts.iter().any(|o| o == "ro"),
            });
        }
        Ok(out)
    }

    /// Points mount `index` at `source` (a shifted mount) and drops its idmap: the runtime
    /// then bind-mounts the already shifted tree.
    pub fn replace_mount_source(&mut self, index: usize, source: &Path) {
        self.set_mount_source(index, source);
        let Some(m) = self.value["mounts"].get_mut(index) else {
            return;
        };
        if let Some(obj) = m.as_object_mut() {
            obj.remove("uidMappings");
            obj.remove("gidMappings");
        }
        if let Some(opts) = m["options"].as_array_mut() {
            opts.retain(|o| o != "idmap" && o != "ridmap");
        }
    }

    /// Points mount `index` at `source` and keeps its idmap, for the runtime to make over an
    /// idmappable mount.
    pub fn set_mount_source(&mut self, index: usize, source: &Path) {
        if let Some(m) = self.value["mounts"].get_mut(index) {
            m["source"] = Value::String(source.to_string_lossy().into_owned());
        }
    }

    /// Makes relative bind-mount sources absolute, since the runtime reads them relative to
    /// a bundle that is now elsewhere.
    pub fn absolute_bind_sources(&mut self, bundle: &Path) {
        let Some(mounts) = self.value["mounts"].as_array_mut() else {
            return;
        };
        for m in mounts {
            let bind =
                m["type"] == "bind" || options(m).iter().any(|o| o == "bind" || o == "rbind");
            if let (true, Some(src)) = (bind, m["source"].as_str())
                && !src.starts_with('/')
            {
                m["source"] = Value::String(bundle.join(src).to_string_lossy().into_owned());
            }
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.value).unwrap_or_default()
    }
}

fn options(m: &Value) -> Vec<String> {
    m["options"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        Spec {
            value: serde_json::from_str(json).unwrap(),
            path: "/b/config.json".into(),
        }
    }

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2", "x-unknown": {"kept": true},
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data",
             "options": ["rbind", "idmap", "ro"],
             "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
             "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]},
            {"destination": "/rel", "type": "none", "source": "rel", "options": ["bind"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 300000, "size": 1000}]}
    }"#;

    #[test]
    fn the_user_namespace_map_is_container_id_to_host_id() {
        let m = spec(CONFIG).user_mapping().unwrap().unwrap();
        assert_eq!(m.to_string(), "u:0:200000:65536,g:0:300000:1000");
    }

    #[test]
    fn no_map_without_a_new_user_namespace() {
        let s = spec(&CONFIG.replace(
            r#"{"type": "user"}"#,
            r#"{"type": "user", "path": "/proc/1/ns/user"}"#,
        ));
        assert_eq!(s.user_mapping().unwrap(), None);
        let s = spec(&CONFIG.replace(r#", {"type": "user"}"#, ""));
        assert_eq!(s.user_mapping().unwrap(), None);
    }

    #[test]
    fn half_a_mapping_is_an_error_that_says_so() {
        let s = spec(
            r#"{"linux": {"namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}}"#,
        );
        let e = s.user_mapping().unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn idmapped_bind_mounts_are_found_and_rewritten() {
        let mut s = spec(CONFIG);
        let found = s.idmap_mounts(Path::new("/b")).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].index, 1);
        assert_eq!(found[0].source, PathBuf::from("/srv/data"));
        assert!(found[0].read_only);
        assert_eq!(found[0].mapping.to_string(), "b:0:100000:65536");
        s.replace_mount_source(1, Path::new("/run/shiftfs/oci/c/vol-1"));
        s.absolute_bind_sources(Path::new("/b"));
        s.set_root_path(Path::new("/run/shiftfs/oci/c/rootfs"));
        let v: Value = serde_json::from_slice(&s.to_json()).unwrap();
        let data = &v["mounts"][1];
        assert_eq!(data["source"], "/run/shiftfs/oci/c/vol-1");
        assert!(data.get("uidMappings").is_none() && data.get("gidMappings").is_none());
        assert_eq!(data["options"], serde_json::json!(["rbind", "ro"]));
        assert_eq!(v["mounts"][2]["source"], "/b/rel");
        assert_eq!(v["mounts"][0]["source"], "proc");
        assert_eq!(v["root"]["path"], "/run/shiftfs/oci/c/rootfs");
        assert_eq!(v["x-unknown"]["kept"], true);
        assert!(s.idmap_mounts(Path::new("/b")).unwrap().is_empty());
    }

    #[test]
    fn a_read_only_root_is_seen() {
        assert!(!spec(CONFIG).root_read_only());
        assert!(
            spec(&CONFIG.replace(r#""readonly": false"#, r#""readonly": true"#)).root_read_only()
        );
    }

    #[test]
    fn root_path_is_relative_to_the_bundle() {
        assert_eq!(
            spec(CONFIG).root_path(Path::new("/b")).unwrap(),
            PathBuf::from("/b/rootfs")
        );
    }
}
