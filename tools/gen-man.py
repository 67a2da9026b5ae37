#!/usr/bin/env python3
"""Man pages and shell completions from instar's own help texts.

Usage: tools/gen-man.py INSTAR_BINARY OUTDIR [--version V] [--date YYYY-MM-DD]

Writes OUTDIR/man/instar.1 and OUTDIR/man/instar-COMMAND.1 for every
command the binary implements, OUTDIR/completion/instar.bash and
OUTDIR/completion/_instar (zsh). Man pages are gzipped (-9n, no name or
time stamp) as both Debian and Fedora ship them.

The source of truth is the built binary: `instar --help` lists the commands
("(not implemented yet)" marks the others) and `instar COMMAND --help` the
options of each, so a command added to the CLI gets its page and its
completion without touching this script. `--qemu-version 10.0+rework` and
`--config /dev/null` make the texts independent of the host's qemu-img and
config (classic grammars answer `COMMAND --help` with the main help).
"""

import argparse
import datetime
import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

FIXED = ["--config", "/dev/null", "--qemu-version", "10.0+rework"]
NOT_IMPLEMENTED = " (not implemented yet)"


def run_help(binary, *args):
    r = subprocess.run([binary, *FIXED, *args, "--help"], capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"})
    if r.returncode != 0:
        return None
    return r.stdout


def parse_main(text):
    """Sections of the main help: options, commands, formats."""
    lines = text.splitlines()
    sections = {}
    name = None
    for line in lines:
        if line and not line.startswith(" ") and line.rstrip().endswith(":"):
            name = line.rstrip()[:-1]
            sections[name] = []
        elif name is not None:
            sections[name].append(line)

    def options(body):
        out = []
        for line in body:
            if re.match(r"^  -", line):
                out.append([line.strip(), ""])
            elif line.startswith("     ") and out:
                out[-1][1] = (out[-1][1] + " " + line.strip()).strip()
        return out

    std = next((v for k, v in sections.items() if k.startswith("Standard options")), [])
    own = next((v for k, v in sections.items() if k.startswith("instar options")), [])
    cmds = next((v for k, v in sections.items() if k.startswith("Recognized commands")), [])
    fmts = next((v for k, v in sections.items() if k.startswith("Supported image formats")), [])
    commands = []
    for line in cmds:
        m = re.match(r"^  (\S+) - (.*)$", line)
        if m:
            what = m.group(2)
            implemented = not what.endswith(NOT_IMPLEMENTED)
            commands.append((m.group(1), what.removesuffix(NOT_IMPLEMENTED), implemented))
    formats = " ".join(x.strip() for x in fmts if x.strip()).split()
    return options(std), options(own), commands, formats


def parse_command(text):
    """Usage, description paragraphs, options (name, arg, text), notes."""
    lines = text.splitlines()
    usage = []
    i = 0
    while i < len(lines) and lines[i].strip():
        usage.append(lines[i].strip())
        i += 1
    usage = " ".join(usage)
    usage = re.sub(r"^Usage:\s*", "", usage)
    paras, opts, notes = [], [], []
    cur = []
    for line in lines[i:]:
        if not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m and m.group(2):
            opts.append([m.group(1), m.group(2)])
        elif m:
            notes.append(m.group(1))
        elif line.startswith("    ") and opts:
            opts[-1][1] += " " + line.strip()
        else:
            cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    return usage, paras, opts, notes


def esc(s):
    """Roff text: backslashes, minus signs, leading control characters."""
    s = s.replace("\\", "\\e").replace("-", "\\-")
    if s.startswith((".", "'")):
        s = "\\&" + s
    return s


def opt_roff(spec):
    """`-f, --format FMT` -> bold names, italic arguments."""
    parts = []
    for piece in re.split(r",\s*", spec):
        words = piece.split(" ", 1)
        name = words[0]
        arg = words[1] if len(words) > 1 else ""
        if "=" in name:
            name, arg = name.split("=", 1)
        r = f"\\fB{esc(name)}\\fR"
        if arg:
            r += f" \\fI{esc(arg)}\\fR"
        parts.append(r)
    return ", ".join(parts)


def header(title, version, date, name, what):
    return [
        f'.TH {title.upper()} 1 "{date}" "instar {version}" "User Commands"',
        ".SH NAME",
        f"{esc(name)} \\- {esc(what)}",
    ]


def main_page(version, date, std, own, commands, formats, description):
    out = header("instar", version, date, "instar", description)
    out += [
        ".SH SYNOPSIS",
        ".B instar",
        "[\\fIstandard options\\fR] \\fICOMMAND\\fR [\\fB\\-\\-help\\fR | \\fIcommand options\\fR]",
        ".SH DESCRIPTION",
        "instar takes qemu\\-img's command line and prints the same bytes as the",
        "qemu\\-img installed beside it, while every byte of the image is parsed",
        "inside a KVM micro\\-VM that can reach nothing else. A hostile image gets a",
        "one\\-line error and exit status 1.",
        ".PP",
        "The output follows the version of the local \\fBqemu\\-img\\fR (found on",
        "\\fBPATH\\fR or named in the configuration), \\fB\\-\\-qemu\\-version\\fR, or the",
        "newest known layout when no qemu\\-img is installed. instar needs read and",
        "write access to \\fI/dev/kvm\\fR.",
        ".SH OPTIONS",
    ]
    for spec, text in std:
        out += [".TP", opt_roff(spec), esc(text)]
    out += [".SS instar options (before or after COMMAND)"]
    for spec, text in own:
        out += [".TP", opt_roff(spec), esc(text)]
    out += [".SH COMMANDS"]
    for name, what, implemented in commands:
        out += [".TP"]
        if implemented:
            out += [f".BR instar\\-{esc(name)} (1)", esc(what)]
        else:
            out += [f".B {esc(name)}", esc(what) + " (not implemented yet: exits 1 with a message)"]
    if formats:
        out += [".SH IMAGE FORMATS", esc(" ".join(formats))]
    out += [
        ".SH EXIT STATUS",
        "As qemu\\-img's for the command; 1 for a usage error, an image instar",
        "refuses, or a command it does not implement.",
        ".SH ENVIRONMENT",
        ".TP",
        ".B INSTAR_CONFIG",
        "configuration file used instead of \\fI/etc/instar/config.toml\\fR.",
        ".SH FILES",
        ".TP",
        ".I /etc/instar/config.toml",
        "optional settings (qemu\\-img version to imitate, timeout, memory, allowed",
        "paths for backing files). Absent means defaults.",
        ".TP",
        ".I /dev/kvm",
        "the sandbox runs the parser in a KVM virtual machine.",
        ".SH SEE ALSO",
        ".BR qemu\\-img (1),",
    ]
    refs = [f".BR instar\\-{esc(n)} (1)" for n, _, impl in commands if impl]
    out += [r + "," for r in refs[:-1]] + refs[-1:]
    return "\n".join(out) + "\n"


def command_page(version, date, name, what, usage, paras, opts, notes):
    out = header(f"instar-{name}", version, date, f"instar-{name}", what)
    synopsis = re.sub(r"^qemu-img\s+", "", usage)
    out += [".SH SYNOPSIS", f".B instar", esc(synopsis), ".SH DESCRIPTION"]
    out += [x for p in paras for x in (esc(p), ".PP")][:-1] or [esc(what)]
    if opts:
        out += [".SH OPTIONS"]
        for spec, text in opts:
            out += [".TP", opt_roff(spec), esc(text)]
    if notes:
        out += [".SH NOTES"] + [x for n in notes for x in (esc(n), ".PP")][:-1]
    out += [".SH SEE ALSO", ".BR instar (1),", ".BR qemu\\-img (1)"]
    return "\n".join(out) + "\n"


def option_words(opts):
    """Names and value hints of one command's options."""
    names, values = [], {}
    for spec, _ in opts:
        pieces = [p.split(" ", 1) for p in re.split(r",\s*", spec)]
        # `-f, --format FMT`: the argument applies to every spelling.
        arg = next((w[1] for w in pieces if len(w) > 1), "")
        for w in pieces:
            name = w[0].split("=", 1)[0]
            names.append(name)
            if arg:
                values[name] = arg
    return names, values


def value_words(arg, formats):
    if "|" in arg:
        return arg.split("|")
    if arg == "FMT":
        return formats
    return None  # a file or free text


def bash_completion(std, own, commands, per_cmd, formats):
    global_names, _ = option_words(std + own)
    cmd_names = [n for n, _, _ in commands]
    lines = [
        "# bash completion for instar (generated by tools/gen-man.py)",
        "_instar()",
        "{",
        "    local cur prev cmd i",
        "    cur=${COMP_WORDS[COMP_CWORD]}",
        "    prev=${COMP_WORDS[COMP_CWORD-1]}",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        case ${COMP_WORDS[i]} in",
        "            --qemu-version|--timeout|--config|-T|--trace) ((i++)) ;;",
        "            -*) ;;",
        "            *) cmd=${COMP_WORDS[i]}; break ;;",
        "        esac",
        "    done",
        "    case $prev in",
        "        --qemu-version|--timeout|-T|--trace) return ;;",
        "        --config) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;",
    ]
    seen = set()
    for name, (opts, values) in per_cmd.items():
        for opt, arg in values.items():
            words = value_words(arg, formats)
            key = (opt, tuple(words) if words else None)
            if opt in seen or words is None:
                continue
            seen.add(opt)
            lines.append(f"        {opt}) COMPREPLY=($(compgen -W \"{' '.join(words)}\" -- \"$cur\")); return ;;")
    lines += [
        "    esac",
        "    local opts",
        "    case $cmd in",
        f"        '') opts=\"{' '.join(global_names)}\" ;;",
    ]
    for name, (opts, _) in per_cmd.items():
        lines.append(f"        {name}) opts=\"{' '.join(opts)} --qemu-version --timeout --config\" ;;")
    lines += [
        "    esac",
        "    if [[ $cur == -* ]]; then",
        "        COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))",
        "    elif [[ -z $cmd ]]; then",
        f"        COMPREPLY=($(compgen -W \"{' '.join(cmd_names)}\" -- \"$cur\"))",
        "    else",
        "        COMPREPLY=($(compgen -f -- \"$cur\"))",
        "    fi",
        "}",
        "complete -o filenames -o bashdefault -F _instar instar",
    ]
    return "\n".join(lines) + "\n"


def zsh_quote(s):
    return s.replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def zsh_completion(std, own, commands, per_cmd_opts, formats):
    lines = [
        "#compdef instar",
        "# zsh completion for instar (generated by tools/gen-man.py)",
        "",
        "_instar() {",
        "  local -a commands own",
        "  commands=(",
    ]
    for name, what, implemented in commands:
        note = "" if implemented else " (not implemented)"
        lines.append(f"    '{name}:{zsh_quote(what + note)}'")
    lines += [
        "  )",
        "  own=(",
        "    '--qemu-version=[imitate this qemu-img version]:version:'",
        "    '--timeout=[deadline for the sandboxed parser]:seconds:'",
        "    '--config=[configuration file]:file:_files'",
        "  )",
        "  local curcontext=$curcontext state line",
        "  _arguments -C $own \\",
        "    '(- *)'{-h,--help}'[display help and exit]' \\",
        "    '(- *)'{-V,--version}'[display version info and exit]' \\",
        "    '1:command:->command' '*::argument:->argument'",
        "  case $state in",
        "    command) _describe -t commands 'instar command' commands ;;",
        "    argument)",
        "      case $words[1] in",
    ]
    for name, opts in per_cmd_opts.items():
        specs = []
        for spec, text in opts:
            names = []
            arg = ""
            for piece in re.split(r",\s*", spec):
                w = piece.split(" ", 1)
                names.append(w[0].split("=", 1)[0])
                if len(w) > 1:
                    arg = w[1]
            words = value_words(arg, formats) if arg else None
            action = ""
            if arg:
                action = f":{zsh_quote(arg)}:" + (f"({' '.join(words)})" if words else "_files")
            desc = zsh_quote(text.split(" (")[0])
            for n in names:
                specs.append(f"'{n}[{desc}]{action}'")
        lines.append(f"        {name}) _arguments $own {' '.join(specs)} '*:image file:_files' ;;")
    lines += [
        "        *) _files ;;",
        "      esac ;;",
        "  esac",
        "}",
        "",
        '_instar "$@"',
    ]
    return "\n".join(lines) + "\n"


def write(path, data, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode()
    if gz:
        # mtime=0 and no file name: reproducible, and lintian wants no stamp.
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", filename="", mtime=0, compresslevel=9) as z:
            z.write(raw)
    else:
        path.write_bytes(raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("outdir")
    ap.add_argument("--version", default="")
    ap.add_argument("--date", default="")
    ap.add_argument("--description",
                    default="sandboxed, drop-in replacement for qemu-img for untrusted disk images")
    args = ap.parse_args()
    date = args.date
    if not date:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
        when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch else datetime.datetime.now(datetime.timezone.utc)
        date = when.strftime("%Y-%m-%d")
    version = args.version
    if not version:
        v = subprocess.run([args.binary, *FIXED, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"\(instar ([^)]+)\)", v)
        version = m.group(1) if m else "unknown"

    main_help = run_help(args.binary)
    if not main_help or "Recognized commands" not in main_help:
        sys.exit(f"gen-man: {args.binary} --help gave no command list")
    std, own, commands, formats = parse_main(main_help)
    out = Path(args.outdir)
    man = out / "man"
    if man.exists():
        for old in man.glob("*.1*"):
            old.unlink()
    write(man / "instar.1.gz", main_page(version, date, std, own, commands, formats, args.description), gz=True)

    per_cmd, per_cmd_opts = {}, {}
    pages = ["instar.1.gz"]
    for name, what, implemented in commands:
        if not implemented:
            continue
        text = run_help(args.binary, name)
        if not text or "Recognized commands" in text:
            sys.exit(f"gen-man: '{name} --help' printed no command help")
        usage, paras, opts, notes = parse_command(text)
        write(man / f"instar-{name}.1.gz", command_page(version, date, name, what, usage, paras, opts, notes), gz=True)
        pages.append(f"instar-{name}.1.gz")
        names, values = option_words(opts)
        per_cmd[name] = (names, values)
        per_cmd_opts[name] = opts
    write(out / "completion" / "instar.bash", bash_completion(std, own, commands, per_cmd, formats))
    write(out / "completion" / "_instar", zsh_completion(std, own, commands, per_cmd_opts, formats))
    print(f"gen-man: {len(pages)} man pages ({', '.join(pages)}), bash and zsh completion in {out}")


if __name__ == "__main__":
    main()
