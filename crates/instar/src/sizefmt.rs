//! qemu's `size_to_str`: the `192 KiB` strings of the human output.

const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// The binary exponent `frexp` would return for a finite `x >= 0`.
fn frexp_exponent(x: f64) -> i32 {
    if x == 0.0 {
        return 0;
    }
    let bits = x.to_bits();
    let biased = i32::try_from((bits >> 52) & 0x7FF).unwrap_or(0);
    if biased == 0 {
        // Subnormal: cannot occur for u64 inputs, kept for totality.
        return -1021;
    }
    biased - 1022
}

/// Format `val` like qemu: pick the power of 1024 so that the integer part
/// stays below 1000 (hence `val / (1000/1024)` in the exponent), then print
/// with C's `%0.3g`.
pub fn size_to_str(val: u64) -> String {
    // Lossy on purpose: qemu converts to double here too.
    #[allow(clippy::cast_precision_loss)]
    let v = val as f64;
    let e = frexp_exponent(v / (1000.0 / 1024.0));
    // C integer division truncates toward zero; so does Rust's.
    let i = usize::try_from((e - 1) / 10)
        .unwrap_or(0)
        .min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(v / div), SUFFIXES[i])
}

/// C's `%0.3g` for a finite non-negative value.
pub fn format_g3(v: f64) -> String {
    const P: i32 = 3;
    if v == 0.0 {
        return "0".to_string();
    }
    // The exponent after rounding to P significant digits decides the style.
    let sci = format!("{:.*e}", usize::try_from(P - 1).unwrap_or(2), v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if !(-4..P).contains(&x) {
        let m = strip_zeros(mantissa);
        let sign = if x < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", x.abs())
    } else {
        let prec = usize::try_from(P - 1 - x).unwrap_or(0);
        strip_zeros(&format!("{v:.prec$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from qemu-img 10.0.2 output (notes, and images made here).
    #[test]
    fn vectors() {
        for (v, s) in [
            (0u64, "0 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1536, "1.5 KiB"),
            (4096, "4 KiB"),
            (4608, "4.5 KiB"),
            (197120, "192 KiB"),
            (200704, "196 KiB"),
            (1023488, "1e+03 KiB"),
            (1024000, "0.977 MiB"),
            (2297856, "2.19 MiB"),
            (1073741824, "1 GiB"),
            (1073995776, "1 GiB"),
            (18845696, "18 MiB"),
            (1265664, "1.21 MiB"),
        ] {
            assert_eq!(size_to_str(v), s, "{v}");
        }
    }
}
