//! A faithful model of glibc's `getopt_long`, because qemu-img's usage
//! errors are getopt's own messages (or built from getopt's `optind`), and
//! scripts compare them. Supports clustered short options, attached and
//! separate arguments, `--name=value`, unambiguous long prefixes, argument
//! permutation (or stopping at the first operand with `+`/POSIXLY_CORRECT)
//! and `--`.

/// Does an option take an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// Needs a value.
    Required,
}

/// One long option; `id` is what the parser reports for it.
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    /// Name without `--`.
    pub name: &'static str,
    /// Whether it takes a value.
    pub has_arg: HasArg,
    /// Identifier reported (a short option letter, or any other value).
    pub id: u32,
}

/// A long option (for the per-command option tables).
pub const fn long(name: &'static str, has_arg: HasArg, id: u32) -> LongOpt {
    LongOpt { name, has_arg, id }
}

/// The option id of a short option letter.
pub const fn c(ch: char) -> u32 {
    ch as u32
}

/// A parser specification.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Short options, getopt style (`f:hU`): a letter followed by `:` takes
    /// a value.
    pub short: &'static str,
    /// Long options in table order (the order of "possibilities" when a
    /// prefix is ambiguous).
    pub long: &'static [LongOpt],
    /// Stop at the first operand (`+` in the option string).
    pub stop_at_operand: bool,
}

/// What went wrong, with everything needed for glibc's message and for
/// qemu's `argv[optind - 1]` messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetoptError {
    /// `invalid option -- 'x'`.
    InvalidShort(char),
    /// `option requires an argument -- 'f'`.
    MissingShortArg(char),
    /// `unrecognized option '--bogus=1'` (text as typed).
    UnrecognizedLong(String),
    /// `option '--o=json' is ambiguous; possibilities: '--output' '--object'`.
    Ambiguous(String, Vec<&'static str>),
    /// `option '--output' requires an argument` (full option name).
    MissingLongArg(&'static str),
    /// `option '--force-share' doesn't allow an argument`.
    NoArgAllowed(&'static str),
}

impl GetoptError {
    /// glibc's message, after `ARGV0: `.
    pub fn glibc_message(&self) -> String {
        match self {
            GetoptError::InvalidShort(c) => format!("invalid option -- '{c}'"),
            GetoptError::MissingShortArg(c) => format!("option requires an argument -- '{c}'"),
            GetoptError::UnrecognizedLong(s) => format!("unrecognized option '{s}'"),
            GetoptError::Ambiguous(s, names) => {
                let mut m = format!("option '{s}' is ambiguous; possibilities:");
                for n in names {
                    m.push_str(&format!(" '--{n}'"));
                }
                m
            }
            GetoptError::MissingLongArg(n) => format!("option '--{n}' requires an argument"),
            GetoptError::NoArgAllowed(n) => format!("option '--{n}' doesn't allow an argument"),
        }
    }

    /// True for the errors getopt reports as `:` (missing argument) when the
    /// option string starts with `:`.
    pub fn is_missing_argument(&self) -> bool {
        matches!(
            self,
            GetoptError::MissingShortArg(_) | GetoptError::MissingLongArg(_)
        )
    }
}

/// An error and `argv[optind - 1]` at the time getopt returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The error.
    pub error: GetoptError,
    /// `argv[optind - 1]` (what qemu's classic messages quote).
    pub prev_arg: String,
}

/// Result of a successful parse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Options in order: id and value.
    pub options: Vec<(u32, Option<String>)>,
    /// Indices (into the argument vector) of the operands, in order.
    pub operands: Vec<usize>,
}

fn short_spec(spec: &Spec, c: char) -> Option<HasArg> {
    let s: Vec<char> = spec.short.chars().filter(|&c| c != '+').collect();
    let i = s.iter().position(|&x| x == c && x != ':')?;
    Some(if s.get(i + 1) == Some(&':') {
        HasArg::Required
    } else {
        HasArg::No
    })
}

/// Parse `args[1..]` (`args[0]` is the program or command name). Parsing
/// stops at the first error, as the callers exit on it.
pub fn parse(spec: &Spec, args: &[String]) -> Result<Parsed, Failure> {
    let stop = spec.stop_at_operand || std::env::var_os("POSIXLY_CORRECT").is_some();
    let mut out = Parsed::default();
    let mut optind = 1usize;
    let fail = |error: GetoptError, optind: usize| Failure {
        error,
        prev_arg: args
            .get(optind.saturating_sub(1))
            .cloned()
            .unwrap_or_default(),
    };
    while optind < args.len() {
        let arg = &args[optind];
        if arg == "--" {
            optind += 1;
            out.operands.extend(optind..args.len());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            if stop {
                out.operands.extend(optind..args.len());
                break;
            }
            out.operands.push(optind);
            optind += 1;
            continue;
        }
        if let Some(body) = arg.strip_prefix("--") {
            optind += 1;
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = spec.long.iter().find(|o| o.name == name);
            let found = match exact {
                Some(o) => *o,
                None => {
                    let matches: Vec<&LongOpt> = spec
                        .long
                        .iter()
                        .filter(|o| o.name.starts_with(name))
                        .collect();
                    let Some(first) = matches.first() else {
                        return Err(fail(GetoptError::UnrecognizedLong(arg.clone()), optind));
                    };
                    // Entries that behave identically are not ambiguous.
                    let ambiguous = matches
                        .iter()
                        .any(|o| o.has_arg != first.has_arg || o.id != first.id);
                    if ambiguous {
                        let names = matches.iter().map(|o| o.name).collect();
                        return Err(fail(GetoptError::Ambiguous(arg.clone(), names), optind));
                    }
                    **first
                }
            };
            match (found.has_arg, value) {
                (HasArg::No, Some(_)) => {
                    return Err(fail(GetoptError::NoArgAllowed(found.name), optind));
                }
                (HasArg::No, None) => out.options.push((found.id, None)),
                (HasArg::Required, Some(v)) => out.options.push((found.id, Some(v))),
                (HasArg::Required, None) => {
                    if optind < args.len() {
                        out.options.push((found.id, Some(args[optind].clone())));
                        optind += 1;
                    } else {
                        return Err(fail(GetoptError::MissingLongArg(found.name), optind));
                    }
                }
            }
            continue;
        }
        // A cluster of short options.
        let chars: Vec<char> = arg.chars().skip(1).collect();
        let mut k = 0usize;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            let last = k == chars.len();
            if last {
                optind += 1;
            }
            match short_spec(spec, c) {
                None => return Err(fail(GetoptError::InvalidShort(c), optind)),
                Some(HasArg::No) => out.options.push((u32::from(c), None)),
                Some(HasArg::Required) => {
                    if !last {
                        let rest: String = chars[k..].iter().collect();
                        out.options.push((u32::from(c), Some(rest)));
                        optind += 1;
                    } else if optind < args.len() {
                        out.options.push((u32::from(c), Some(args[optind].clone())));
                        optind += 1;
                    } else {
                        return Err(fail(GetoptError::MissingShortArg(c), optind));
                    }
                    break;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: u32 = 256;
    const OBJ: u32 = 257;
    const LONG: &[LongOpt] = &[
        LongOpt {
            name: "help",
            has_arg: HasArg::No,
            id: 'h' as u32,
        },
        LongOpt {
            name: "format",
            has_arg: HasArg::Required,
            id: 'f' as u32,
        },
        LongOpt {
            name: "output",
            has_arg: HasArg::Required,
            id: OUT,
        },
        LongOpt {
            name: "object",
            has_arg: HasArg::Required,
            id: OBJ,
        },
        LongOpt {
            name: "force-share",
            has_arg: HasArg::No,
            id: 'U' as u32,
        },
    ];
    const SPEC: Spec = Spec {
        short: "f:hU",
        long: LONG,
        stop_at_operand: false,
    };

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn err(s: &[&str]) -> (String, String) {
        let f = parse(&SPEC, &args(s)).unwrap_err();
        (f.error.glibc_message(), f.prev_arg)
    }

    // Messages as qemu-img 10.0.2 (Debian) prints them after `qemu-img info: `.
    #[test]
    fn glibc_messages() {
        assert_eq!(
            err(&["info", "--bogus", "x"]).0,
            "unrecognized option '--bogus'"
        );
        assert_eq!(err(&["info", "-x", "x"]).0, "invalid option -- 'x'");
        assert_eq!(err(&["info", "-f"]).0, "option requires an argument -- 'f'");
        assert_eq!(
            err(&["info", "--output"]).0,
            "option '--output' requires an argument"
        );
        assert_eq!(
            err(&["info", "--force-share=1", "x"]).0,
            "option '--force-share' doesn't allow an argument"
        );
        assert_eq!(
            err(&["info", "--o=json", "x"]).0,
            "option '--o=json' is ambiguous; possibilities: '--output' '--object'"
        );
        assert_eq!(
            err(&["info", "--f=x", "y"]).0,
            "option '--f=x' is ambiguous; possibilities: '--format' '--force-share'"
        );
    }

    #[test]
    fn optind_quirks() {
        // Invalid letter inside a cluster: optind has not moved past it.
        assert_eq!(err(&["info", "-xU", "x"]).1, "info");
        assert_eq!(err(&["info", "-Ux", "x"]).1, "-Ux");
        assert_eq!(err(&["info", "--bogus", "x"]).1, "--bogus");
        assert_eq!(err(&["info", "-f"]).1, "-f");
    }

    #[test]
    fn permutation_and_values() {
        let p = parse(
            &SPEC,
            &args(&["info", "x", "-fqcow2", "--out", "json", "--", "-y"]),
        )
        .unwrap();
        assert_eq!(
            p.options,
            vec![
                ('f' as u32, Some("qcow2".into())),
                (OUT, Some("json".into()))
            ]
        );
        assert_eq!(p.operands, vec![1, 6]);
        let p = parse(&SPEC, &args(&["info", "-Uf", "raw", "x"])).unwrap();
        assert_eq!(p.options.len(), 2);
        assert_eq!(p.operands, vec![3]);
    }
}
