//! Where a program's settings come from, highest first: flags, the program's environment
//! variables (`BACKHAUL_RELAY_LISTEN`, `BACKHAUL_AGENT_RELAY`, ...), the shared variables of
//! earlier versions (`BACKHAUL_LISTEN`, ...), then the TOML file named by `--config` (or
//! `BACKHAUL_<PROGRAM>_CONFIG`), then the built-in defaults.
//!
//! A file's keys are the long flag names (`max-sessions = 100`; repeatable flags take arrays).
//! Every key and value is checked before the program starts: an unknown key, a value of the
//! wrong type or one the flag would refuse is reported with the file, line and key, and the
//! program exits 64. `--config-example` prints a commented file with every key (dist/ holds
//! one per program).

use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment prefix of `program` (`backhaul-relay` → `BACKHAUL_RELAY_`).
pub fn env_prefix(program: &str) -> String {
    let short = program.strip_prefix("backhaul-").unwrap_or(program);
    format!("BACKHAUL_{}_", short.to_ascii_uppercase().replace('-', "_"))
}

/// One setting read from a file.
#[derive(Debug)]
pub struct FileValue {
    /// The clap id of its flag.
    pub id: String,
    /// Where it is: `path:line`.
    pub at: String,
    pub values: Vec<String>,
}

/// Where each setting that did not come from the command line came from: (long flag name,
/// `path:line` or `environment variable NAME`), set once by [`prepare`].
static ORIGINS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

fn note_origin(long: &str, origin: String) {
    let mut origins = ORIGINS.lock().unwrap_or_else(|p| p.into_inner());
    origins.retain(|(l, _)| l != long);
    origins.push((long.to_string(), origin));
}

/// `msg` with where its `--flags` were set, when that was not the command line: a setting
/// checked after parsing (two that exclude each other, a path that does not exist) then names
/// the file line or the variable to change.
pub fn annotate(msg: &str) -> String {
    annotate_with(msg, &ORIGINS.lock().unwrap_or_else(|p| p.into_inner()))
}

fn annotate_with(msg: &str, origins: &[(String, String)]) -> String {
    // In the order the message names them.
    let mut named: Vec<(usize, String)> = origins
        .iter()
        .filter_map(|(long, origin)| {
            Some((mentioned_at(msg, long)?, format!("--{long} from {origin}")))
        })
        .collect();
    named.sort();
    let named: Vec<String> = named.into_iter().map(|(_, n)| n).collect();
    if named.is_empty() {
        msg.to_string()
    } else {
        format!("{msg} [{}]", named.join("; "))
    }
}

/// Where `msg` first names `--long` as a whole word (not `--long-file`).
fn mentioned_at(msg: &str, long: &str) -> Option<usize> {
    let flag = format!("--{long}");
    msg.match_indices(&flag).map(|(i, _)| i).find(|&i| {
        msg[i + flag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

/// Builds `cmd` for `program` from `argv`: program-specific environment names, then the shared
/// names and the file's values beneath them. Errors are one line for the operator.
///
/// The shared names' and the file's values reach clap as the program's own environment
/// variables (set here, before any thread starts, only where the variable is unset), so clap
/// ranks them below flags and counts them as present for `required` flags. Repeatable flags
/// without a value delimiter take the file's arrays as their defaults instead.
pub fn prepare(program: &str, cmd: Command, argv: &[OsString]) -> Result<Command, String> {
    let prefix = env_prefix(program);
    // (arg id, the program's variable, the shared variable)
    let names: Vec<(String, String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let old = a.get_env()?.to_str()?.to_string();
            let new = format!("{prefix}{}", old.strip_prefix("BACKHAUL_")?);
            Some((a.get_id().to_string(), new, old))
        })
        .collect();
    let unset = |name: &str| std::env::var_os(name).is_none();
    let long_of = |id: &str| {
        cmd.get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_long())
            .map(str::to_string)
    };
    // The shared names of earlier versions, beneath the program's own (not the file's name:
    // one exported file name would send every program to the same file).
    for (id, new, old) in &names {
        let long = long_of(id).filter(|l| !on_command_line(argv, l));
        if !unset(new) {
            if let Some(long) = &long {
                note_origin(long, format!("environment variable {new}"));
            }
        } else if id != "config" {
            if let Some(v) = std::env::var_os(old) {
                std::env::set_var(new, v);
                if let Some(long) = &long {
                    note_origin(long, format!("environment variable {old}"));
                }
            }
        }
    }
    // The file, beneath the environment (not for --help and --version, which must work
    // whatever the file holds).
    let mut defaults: Vec<(String, Vec<String>)> = Vec::new();
    let asks_help = argv
        .iter()
        .skip(1)
        .any(|a| matches!(a.to_str(), Some("--help" | "-h" | "--version" | "-V")));
    if let Some(path) = config_path(argv, &prefix).filter(|_| !asks_help) {
        for FileValue { id, at, values } in read_file(&cmd, &path)? {
            let var = names.iter().find(|(i, _, _)| *i == id).map(|(_, n, _)| n);
            let arg = cmd.get_arguments().find(|a| a.get_id() == id.as_str());
            let delimiter = arg.and_then(|a| a.get_value_delimiter());
            let long = long_of(&id).filter(|l| !on_command_line(argv, l));
            let taken = match var {
                // An empty list sets nothing (the variable would read as one empty value).
                Some(_) if values.is_empty() => false,
                Some(var) if values.len() == 1 || delimiter.is_some() => {
                    let free = unset(var);
                    if free {
                        let joined = values.join(&delimiter.unwrap_or(',').to_string());
                        std::env::set_var(var, joined);
                    }
                    free
                }
                // A list clap reads as defaults: the environment still comes first.
                _ => {
                    defaults.push((id, values));
                    var.is_none_or(|v| unset(v))
                }
            };
            if let (true, Some(long)) = (taken, long) {
                note_origin(&long, at);
            }
        }
    }
    // clap reads a variable when it is named: after the values above are in place.
    let mut cmd = cmd.mut_args(
        |a| match names.iter().find(|(i, _, _)| a.get_id() == i.as_str()) {
            Some((_, new, _)) => a.env(new.clone()),
            None => a,
        },
    );
    for (id, values) in defaults {
        cmd = cmd.mut_arg(&id, |a| a.default_values(values).required(false));
    }
    Ok(cmd)
}

/// Whether `argv` gives `--long` (as `--long VALUE` or `--long=VALUE`).
pub fn on_command_line(argv: &[OsString], long: &str) -> bool {
    argv.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    })
}

/// `--config PATH` / `--config=PATH` on the command line, else `<PREFIX>CONFIG`.
fn config_path(argv: &[OsString], prefix: &str) -> Option<PathBuf> {
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
        if a == "--" {
            break;
        }
    }
    std::env::var_os(format!("{prefix}CONFIG")).map(PathBuf::from)
}

/// The args a file may set: every long flag but the file itself and help/version.
fn settable(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long()
            .is_some_and(|l| !matches!(l, "config" | "help" | "version" | "check"))
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::Version | ArgAction::HelpLong | ArgAction::HelpShort
            )
    })
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads and checks a config file against `cmd`'s flags.
pub fn read_file(cmd: &Command, path: &Path) -> Result<Vec<FileValue>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("could not read the config file {shown}: {e}"))?;
    let table = toml::de::DeTable::parse(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(&text, s.start));
        format!(
            "{shown}:{line}: not valid TOML: {}",
            e.message().lines().next().unwrap_or_default()
        )
    })?;
    let mut out = Vec::new();
    for (key, value) in table.get_ref() {
        let line = line_of(&text, key.span().start);
        let name = key.get_ref().as_ref();
        let at = |what: String| format!("{shown}:{line}: {name}: {what}");
        let Some(arg) = settable(cmd).find(|a| a.get_long() == Some(name)) else {
            let hint = settable(cmd)
                .filter_map(|a| a.get_long())
                .map(|l| (distance(&l.replace('-', "_"), &name.replace('-', "_")), l))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, l)| format!(" (did you mean {l}?)"))
                .unwrap_or_default();
            return Err(at(format!(
                "no such setting{hint}; the settings are the long flag names, listed by --config-example"
            )));
        };
        let many = matches!(arg.get_action(), ArgAction::Append);
        let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let scalar = |v: &toml::de::DeValue<'_>| -> Result<String, String> {
            use toml::de::DeValue;
            match v {
                DeValue::String(s) if !flag => Ok(s.to_string()),
                DeValue::Integer(i) if !flag => {
                    let digits = i.as_str().replace('_', "");
                    i64::from_str_radix(
                        digits
                            .trim_start_matches("0x")
                            .trim_start_matches("0o")
                            .trim_start_matches("0b"),
                        i.radix(),
                    )
                    .map(|n| n.to_string())
                    .map_err(|e| at(format!("{e}")))
                }
                DeValue::Float(f) if !flag => Ok(f.as_str().to_string()),
                DeValue::Boolean(b) if flag => Ok(b.to_string()),
                other if flag => Err(at(format!(
                    "expected true or false, found a {}",
                    other.type_str()
                ))),
                other => Err(at(format!(
                    "expected a string or a number, found a {}",
                    other.type_str()
                ))),
            }
        };
        let values = match value.get_ref() {
            toml::de::DeValue::Array(items) if many => items
                .iter()
                .map(|v| scalar(v.get_ref()))
                .collect::<Result<Vec<_>, _>>()?,
            toml::de::DeValue::Array(_) => {
                return Err(at("takes one value, not an array".to_string()))
            }
            v => vec![scalar(v)?],
        };
        if flag && values == ["false"] {
            continue;
        }
        if values.iter().any(|v| v.contains('\0')) {
            return Err(at("a value may not contain a NUL character".to_string()));
        }
        // The flag's own parser judges each value, as it would on the command line.
        let probe = Command::new("probe").no_binary_name(true).arg(
            Arg::new("value")
                .long(name.to_string())
                .value_parser(arg.get_value_parser().clone())
                .action(ArgAction::Append),
        );
        for v in values.iter().filter(|_| !flag) {
            probe
                .clone()
                .try_get_matches_from([format!("--{name}={v}")])
                .map_err(|e| {
                    let rendered = e.render().to_string();
                    let first = rendered.lines().next().unwrap_or_default();
                    at(first.trim_start_matches("error: ").to_string())
                })?;
        }
        out.push(FileValue {
            id: arg.get_id().to_string(),
            at: format!("{shown}:{line}"),
            values,
        });
    }
    Ok(out)
}

/// Edit distance between two short names (for "did you mean").
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

/// A config file with every setting commented out, its help above it and its default.
pub fn example(program: &str, cmd: &Command) -> String {
    let prefix = env_prefix(program);
    let mut out = format!(
        "# {program}: every setting, commented out with its default (if any).\n\
         # Use with `{program} --config FILE`, or {prefix}CONFIG=FILE. Flags and environment\n\
         # variables ({prefix}<SETTING>, e.g. {prefix}THREADS) take precedence over the file.\n\
         # Made by `{program} --config-example`.\n"
    );
    for arg in settable(cmd) {
        let Some(long) = arg.get_long() else { continue };
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in textwrap(&help, 94) {
            out.push_str(&format!("# {line}\n"));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().to_string())
            .collect();
        let quoted = |v: &str| {
            if v.parse::<i64>().is_ok() || v == "true" || v == "false" {
                v.to_string()
            } else {
                format!("{v:?}")
            }
        };
        let value = match arg.get_action() {
            ArgAction::SetTrue => "true".to_string(),
            ArgAction::Append => format!(
                "[{}]",
                defaults
                    .iter()
                    .map(|d| quoted(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ if defaults.is_empty() => "\"\"".to_string(),
            _ => quoted(&defaults[0]),
        };
        out.push_str(&format!("#{long} = {value}\n"));
    }
    out
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn textwrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Args {
        #[arg(long, env = "BACKHAUL_LISTEN", default_value = "127.0.0.1:1")]
        listen: String,
        #[arg(long, env = "BACKHAUL_MAX_SESSIONS", default_value_t = 10)]
        max_sessions: u32,
        #[arg(long)]
        expose: bool,
        #[arg(long = "allow")]
        allow: Vec<String>,
        #[arg(long, env = "BACKHAUL_RELAY")]
        relay: String,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    /// Writes `text` to a file named `name` in a directory of its own, removed when the
    /// returned guard drops.
    fn file(name: &str, text: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("backhaul-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        Scratch(p)
    }

    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn parse(path: &Path, extra: &[&str]) -> Result<Args, String> {
        let mut argv: Vec<OsString> = vec!["backhaul-test".into(), "--config".into(), path.into()];
        argv.extend(extra.iter().map(OsString::from));
        let cmd = prepare("backhaul-test", Args::command(), &argv)?;
        let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
        Args::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn a_file_sets_defaults_that_flags_override() {
        let p = file(
            "good.toml",
            "# comment\nlisten = \"0.0.0.0:9\"\nmax-sessions = 5\nexpose = true\nallow = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\nrelay = \"http://r\"\n",
        );
        let a = parse(&p, &[]).unwrap();
        assert_eq!(a.listen, "0.0.0.0:9");
        assert_eq!(a.max_sessions, 5);
        assert!(a.expose);
        assert_eq!(a.allow, ["10.0.0.0/8", "192.168.0.0/16"]);
        assert_eq!(
            a.relay, "http://r",
            "a required flag may come from the file"
        );
        let a = parse(&p, &["--max-sessions", "7"]).unwrap();
        assert_eq!(a.max_sessions, 7);
    }

    #[test]
    fn mistakes_name_the_file_line_and_key() {
        for (text, says) in [
            (
                "relay = \"x\"\nlisten = 5\nmax-sesions = 3\n",
                ":3: max-sesions: no such setting (did you mean max-sessions?)",
            ),
            (
                "relay = \"x\"\nmax-sessions = \"many\"\n",
                ":2: max-sessions: invalid value 'many'",
            ),
            (
                "relay = \"x\"\n\nexpose = \"yes\"\n",
                ":3: expose: expected true or false, found a string",
            ),
            (
                "relay = [\"a\", \"b\"]\n",
                ":1: relay: takes one value, not an array",
            ),
            ("relay = \"x\"\nlisten = \n", ":2: not valid TOML"),
            ("config = \"other.toml\"\n", ":1: config: no such setting"),
            (
                "relay = \"x\\u0000\"\n",
                ":1: relay: a value may not contain a NUL",
            ),
        ] {
            let p = file("bad.toml", text);
            let e = parse(&p, &[]).unwrap_err();
            assert!(e.contains(&format!("bad.toml{says}")), "{text:?}: {e}");
        }
        let e = parse(Path::new("/nonexistent/x.toml"), &[]).unwrap_err();
        assert!(
            e.contains("could not read the config file /nonexistent/x.toml"),
            "{e}"
        );
    }

    #[test]
    fn the_example_lists_every_setting_and_parses() {
        let text = example("backhaul-test", &Args::command());
        for key in [
            "#listen = \"127.0.0.1:1\"",
            "#max-sessions = 10",
            "#expose = true",
            "#allow = []",
            "#relay = \"\"",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        assert!(!text.contains("#config"), "{text}");
        // Uncommented, it is a valid file.
        let uncommented: String = text
            .lines()
            .filter(|l| l.starts_with('#') && l.contains(" = "))
            .map(|l| format!("{}\n", &l[1..]))
            .collect();
        let p = file("example.toml", &uncommented);
        read_file(&Args::command(), &p).unwrap();
    }

    #[test]
    fn errors_name_where_their_settings_came_from() {
        let origins = [
            (
                "admin-token-file".to_string(),
                "environment variable BACKHAUL_RELAY_ADMIN_TOKEN_FILE".to_string(),
            ),
            ("admin-token".to_string(), "relay.toml:4".to_string()),
            ("listen".to_string(), "relay.toml:1".to_string()),
        ];
        assert_eq!(
            annotate_with("--admin-token and --admin-token-file both given; use one", &origins),
            "--admin-token and --admin-token-file both given; use one [--admin-token from relay.toml:4; --admin-token-file from environment variable BACKHAUL_RELAY_ADMIN_TOKEN_FILE]"
        );
        // A longer flag's name does not count as the shorter one's.
        assert_eq!(
            annotate_with("--admin-token-file: no such file", &origins),
            "--admin-token-file: no such file [--admin-token-file from environment variable BACKHAUL_RELAY_ADMIN_TOKEN_FILE]"
        );
        assert_eq!(
            annotate_with("'--listen <ADDR>' is wrong", &origins),
            "'--listen <ADDR>' is wrong [--listen from relay.toml:1]"
        );
        assert_eq!(annotate_with("nothing named", &origins), "nothing named");
    }

    #[test]
    fn program_specific_environment_names() {
        assert_eq!(env_prefix("backhaul-relay"), "BACKHAUL_RELAY_");
        let cmd = prepare("backhaul-relay", Args::command(), &["x".into()]).unwrap();
        let listen = cmd
            .get_arguments()
            .find(|a| a.get_id() == "listen")
            .unwrap();
        assert_eq!(listen.get_env().unwrap(), "BACKHAUL_RELAY_LISTEN");
    }
}
