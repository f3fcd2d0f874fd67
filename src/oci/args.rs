//! The command line an engine gives an OCI runtime (runc and crun share its shape):
//! `[GLOBAL OPTIONS] COMMAND [OPTIONS] ID [ARGS]`. Only what the wrapper acts on is
//! understood (the command, the container id, the bundle, crun's `--config`); every other
//! argument is passed through unchanged and in order.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::Error;

/// Global options of runc and crun that take a value as the next argument.
const GLOBAL_VALUE_OPTS: &[&str] = &[
    "--root",
    "--log",
    "--log-format",
    "--log-level",
    "--criu",
    "--rootless",
    "--cgroup-manager",
];

/// Command options (of the commands the wrapper looks into) that take a value as the next
/// argument. `-f` is crun's `--config` for create/run, but `--force` for delete.
fn value_opt(command: &str, name: &str) -> bool {
    match command {
        "create" | "run" => matches!(
            name,
            "--bundle"
                | "-b"
                | "--console-socket"
                | "--pid-file"
                | "--preserve-fds"
                | "--config"
                | "-f"
        ),
        _ => false,
    }
}

/// The wrapper's own option; a runtime has no option of that name, and it is not passed on.
const RUNTIME_PATH_OPT: &str = "--runtime-path";

/// One argument after the command.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Arg {
    /// `--name value`, `--name=value` (`inline`) or a flag (`value` None).
    Opt {
        name: String,
        value: Option<OsString>,
        inline: bool,
    },
    Pos(OsString),
}

/// A parsed runtime command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Global options, passed through as given.
    pub globals: Vec<OsString>,
    /// The wrapper's `--runtime-path`, if given before the command.
    pub runtime_path: Option<PathBuf>,
    pub command: Option<String>,
    rest: Vec<Arg>,
}

impl Invocation {
    pub fn parse(args: &[OsString]) -> Result<Self, Error> {
        let mut globals = Vec::new();
        let mut runtime_path = None;
        let mut it = args.iter();
        let mut command = None;
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            if let Some(v) = s.strip_prefix(&format!("{RUNTIME_PATH_OPT}=")) {
                runtime_path = Some(PathBuf::from(v));
            } else if s == RUNTIME_PATH_OPT {
                let v = it.next().ok_or_else(|| {
                    Error::Usage(format!(
                        "{RUNTIME_PATH_OPT} needs a value (the real runtime)"
                    ))
                })?;
                runtime_path = Some(PathBuf::from(v));
            } else if s.starts_with('-') {
                globals.push(a.clone());
                if GLOBAL_VALUE_OPTS.contains(&s.as_ref())
                    && let Some(v) = it.next()
                {
                    globals.push(v.clone());
                }
            } else {
                command = Some(s.into_owned());
                break;
            }
        }
        let mut rest = Vec::new();
        let cmd = command.clone().unwrap_or_default();
        let mut positional = false;
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            if positional || !s.starts_with('-') || s == "-" {
                positional = true;
                rest.push(Arg::Pos(a.clone()));
                continue;
            }
            if s == "--" {
                positional = true;
                rest.push(Arg::Opt {
                    name: "--".into(),
                    value: None,
                    inline: false,
                });
                continue;
            }
            if let Some(eq) = a.as_bytes().iter().position(|&b| b == b'=') {
                let bytes = a.as_bytes();
                let value = OsStr::from_bytes(&bytes[eq + 1..]).to_os_string();
                rest.push(Arg::Opt {
                    name: String::from_utf8_lossy(&bytes[..eq]).into_owned(),
                    value: Some(value),
                    inline: true,
                });
            } else if value_opt(&cmd, &s) {
                let value = it.next().cloned();
                rest.push(Arg::Opt {
                    name: s.into_owned(),
                    value,
                    inline: false,
                });
            } else {
                rest.push(Arg::Opt {
                    name: s.into_owned(),
                    value: None,
                    inline: false,
                });
            }
        }
        Ok(Self {
            globals,
            runtime_path,
            command,
            rest,
        })
    }

    /// The container id: the first argument after the command's options.
    pub fn container_id(&self) -> Option<String> {
        self.rest.iter().find_map(|a| match a {
            Arg::Pos(p) => Some(p.to_string_lossy().into_owned()),
            Arg::Opt { .. } => None,
        })
    }

    fn opt(&self, names: &[&str]) -> Option<&OsString> {
        self.rest.iter().find_map(|a| match a {
            Arg::Opt {
                name,
                value: Some(v),
                ..
            } if names.contains(&name.as_str()) => Some(v),
            _ => None,
        })
    }

    fn flag(&self, names: &[&str]) -> bool {
        self.rest
            .iter()
            .any(|a| matches!(a, Arg::Opt { name, .. } if names.contains(&name.as_str())))
    }

    /// The bundle directory (`--bundle`, `-b`); the runtime's default is the working directory.
    pub fn bundle(&self) -> Option<PathBuf> {
        self.opt(&["--bundle", "-b"]).map(PathBuf::from)
    }

    /// crun's `--config FILE` (`-f`), an alternative to the bundle's config.json.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.opt(&["--config", "-f"]).map(PathBuf::from)
    }

    /// `run --detach` / `-d`: the runtime returns once the container started.
    pub fn detach(&self) -> bool {
        self.flag(&["--detach", "-d"])
    }

    /// The same command line (globals first) with the bundle replaced by `bundle` and crun's
    /// `--config` dropped (the new bundle's config.json holds the rewritten config).
    pub fn with_bundle(&self, bundle: &Path) -> Vec<OsString> {
        let mut out = self.globals.clone();
        out.extend(self.command.iter().map(OsString::from));
        out.push("--bundle".into());
        out.push(bundle.as_os_str().to_os_string());
        for a in &self.rest {
            match a {
                Arg::Opt { name, .. }
                    if ["--bundle", "-b", "--config", "-f"].contains(&name.as_str()) => {}
                a => push_arg(&mut out, a),
            }
        }
        out
    }

    /// The command line as given, without the wrapper's own option.
    pub fn passthrough(&self) -> Vec<OsString> {
        let mut out = self.globals.clone();
        out.extend(self.command.iter().map(OsString::from));
        for a in &self.rest {
            push_arg(&mut out, a);
        }
        out
    }
}

fn push_arg(out: &mut Vec<OsString>, a: &Arg) {
    match a {
        Arg::Pos(p) => out.push(p.clone()),
        Arg::Opt {
            name,
            value: Some(v),
            inline: true,
        } => {
            let mut s = OsString::from(format!("{name}="));
            s.push(v);
            out.push(s);
        }
        Arg::Opt { name, value, .. } => {
            out.push(name.into());
            out.extend(value.iter().cloned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn podman_style_create_is_understood_and_rebuilt() {
        let a = args(
            "--root /run/runc --log /x/log --systemd-cgroup create --bundle /b --pid-file /p c1",
        );
        let inv = Invocation::parse(&a).unwrap();
        assert_eq!(inv.command.as_deref(), Some("create"));
        assert_eq!(inv.container_id().as_deref(), Some("c1"));
        assert_eq!(inv.bundle(), Some(PathBuf::from("/b")));
        assert_eq!(inv.passthrough(), a);
        assert_eq!(
            inv.with_bundle(Path::new("/new")),
            args(
                "--root /run/runc --log /x/log --systemd-cgroup create --bundle /new --pid-file /p c1"
            )
        );
    }

    #[test]
    fn the_wrapper_option_is_taken_out_and_inline_values_kept() {
        let inv = Invocation::parse(&args(
            "--runtime-path=/usr/bin/crun --root=/r run -d -b=/bun --config cfg.json ctr",
        ))
        .unwrap();
        assert_eq!(inv.runtime_path, Some(PathBuf::from("/usr/bin/crun")));
        assert_eq!(inv.container_id().as_deref(), Some("ctr"));
        assert_eq!(inv.bundle(), Some(PathBuf::from("/bun")));
        assert_eq!(inv.config_file(), Some(PathBuf::from("cfg.json")));
        assert!(inv.detach());
        assert_eq!(
            inv.with_bundle(Path::new("/n")),
            args("--root=/r run --bundle /n -d ctr")
        );
    }

    #[test]
    fn delete_force_is_a_flag_not_a_config() {
        let inv = Invocation::parse(&args("delete -f c2")).unwrap();
        assert_eq!(inv.container_id().as_deref(), Some("c2"));
        assert_eq!(inv.config_file(), None);
        assert_eq!(inv.passthrough(), args("delete -f c2"));
    }

    #[test]
    fn a_missing_runtime_path_value_is_a_usage_error() {
        assert!(matches!(
            Invocation::parse(&args("--runtime-path")),
            Err(Error::Usage(_))
        ));
    }
}
