//! Vectors from qemu-img 10.0.2 run here (`qemu-img measure --output=json
//! -O FMT [-o OPTS] --size N`, and the stderr of the failing runs).

use super::*;

/// (target, -o, --size, Ok((required, fully allocated)) or Err(message)).
#[rustfmt::skip]
const SIZE_VECTORS: &[(&str, &str, &str, core::result::Result<(u64, u64), &str>)] = &[
    ("qcow2", "", "0", Ok((196608, 196608))),
    ("qcow2", "", "1", Ok((327680, 393216))),
    ("qcow2", "", "512", Ok((327680, 393216))),
    ("qcow2", "", "1000", Ok((327680, 393216))),
    ("qcow2", "", "65536", Ok((327680, 393216))),
    ("qcow2", "", "1G", Ok((393216, 1074135040))),
    ("qcow2", "", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=512", "0", Ok((1536, 1536))),
    ("qcow2", "cluster_size=512", "1", Ok((2560, 3072))),
    ("qcow2", "cluster_size=512", "512", Ok((2560, 3072))),
    ("qcow2", "cluster_size=512", "1000", Ok((2560, 3584))),
    ("qcow2", "cluster_size=512", "65536", Ok((3072, 68608))),
    ("qcow2", "cluster_size=512", "1G", Ok((21385216, 1095127040))),
    ("qcow2", "cluster_size=512", "1.5G", Ok((32076800, 1642689536))),
    ("qcow2", "cluster_size=512", "100G", Ok((2138404352, 109512586752))),
    ("qcow2", "cluster_size=512", "1T", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=512", "2T", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=512", "16T", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=512", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=4k", "0", Ok((12288, 12288))),
    ("qcow2", "cluster_size=4k", "1", Ok((20480, 24576))),
    ("qcow2", "cluster_size=4k", "512", Ok((20480, 24576))),
    ("qcow2", "cluster_size=4k", "1000", Ok((20480, 24576))),
    ("qcow2", "cluster_size=4k", "65536", Ok((20480, 86016))),
    ("qcow2", "cluster_size=4k", "1G", Ok((2637824, 1076379648))),
    ("qcow2", "cluster_size=4k", "1.5G", Ok((3952640, 1614565376))),
    ("qcow2", "cluster_size=4k", "100G", Ok((262795264, 107636977664))),
    ("qcow2", "cluster_size=4k", "1T", Ok((2690920448, 1102202548224))),
    ("qcow2", "cluster_size=4k", "2T", Ok((5381836800, 2204405092352))),
    ("qcow2", "cluster_size=4k", "16T", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=4k", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "cluster_size=2M", "0", Ok((6291456, 6291456))),
    ("qcow2", "cluster_size=2M", "1", Ok((10485760, 12582912))),
    ("qcow2", "cluster_size=2M", "512", Ok((10485760, 12582912))),
    ("qcow2", "cluster_size=2M", "1000", Ok((10485760, 12582912))),
    ("qcow2", "cluster_size=2M", "65536", Ok((10485760, 12582912))),
    ("qcow2", "cluster_size=2M", "1G", Ok((10485760, 1084227584))),
    ("qcow2", "cluster_size=2M", "1.5G", Ok((10485760, 1621098496))),
    ("qcow2", "cluster_size=2M", "100G", Ok((10485760, 107384668160))),
    ("qcow2", "cluster_size=2M", "1T", Ok((12582912, 1099524210688))),
    ("qcow2", "cluster_size=2M", "2T", Ok((18874368, 2199042129920))),
    ("qcow2", "cluster_size=2M", "16T", Ok((92274688, 17592278319104))),
    ("qcow2", "cluster_size=2M", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "refcount_bits=1", "0", Ok((196608, 196608))),
    ("qcow2", "refcount_bits=1", "1", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=1", "512", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=1", "1000", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=1", "65536", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=1", "1G", Ok((393216, 1074135040))),
    ("qcow2", "refcount_bits=1", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "refcount_bits=1", "100G", Ok((13565952, 107387748352))),
    ("qcow2", "refcount_bits=1", "1T", Ok((136577024, 1099648204800))),
    ("qcow2", "refcount_bits=1", "2T", Ok((272891904, 2199296147456))),
    ("qcow2", "refcount_bits=1", "16T", Ok((2181496832, 17594367541248))),
    ("qcow2", "refcount_bits=1", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "refcount_bits=64", "0", Ok((196608, 196608))),
    ("qcow2", "refcount_bits=64", "1", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=64", "512", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=64", "1000", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=64", "65536", Ok((327680, 393216))),
    ("qcow2", "refcount_bits=64", "1G", Ok((524288, 1074266112))),
    ("qcow2", "refcount_bits=64", "1.5G", Ok((655360, 1611268096))),
    ("qcow2", "refcount_bits=64", "100G", Ok((26476544, 107400658944))),
    ("qcow2", "refcount_bits=64", "1T", Ok((268697600, 1099780325376))),
    ("qcow2", "refcount_bits=64", "2T", Ok((537198592, 2199560454144))),
    ("qcow2", "refcount_bits=64", "16T", Ok((4296212480, 17596482256896))),
    ("qcow2", "refcount_bits=64", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "0", Ok((49152, 49152))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "1", Ok((81920, 98304))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "512", Ok((81920, 98304))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "1000", Ok((81920, 98304))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "65536", Ok((81920, 147456))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "1G", Ok((655360, 1074397184))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "1.5G", Ok((950272, 1611563008))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "100G", Ok((59064320, 107433246720))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "1T", Ok((604356608, 1100115984384))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "2T", Ok((1208664064, 2200231919616))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "16T", Ok((9669033984, 17601855078400))),
    ("qcow2", "refcount_bits=8,cluster_size=16k", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "extended_l2=on", "0", Ok((196608, 196608))),
    ("qcow2", "extended_l2=on", "1", Ok((327680, 393216))),
    ("qcow2", "extended_l2=on", "512", Ok((327680, 393216))),
    ("qcow2", "extended_l2=on", "1000", Ok((327680, 393216))),
    ("qcow2", "extended_l2=on", "65536", Ok((327680, 393216))),
    ("qcow2", "extended_l2=on", "1G", Ok((524288, 1074266112))),
    ("qcow2", "extended_l2=on", "1.5G", Ok((655360, 1611268096))),
    ("qcow2", "extended_l2=on", "100G", Ok((29753344, 107403935744))),
    ("qcow2", "extended_l2=on", "1T", Ok((302252032, 1099813879808))),
    ("qcow2", "extended_l2=on", "2T", Ok((604241920, 2199627497472))),
    ("qcow2", "extended_l2=on", "16T", Ok((4832755712, 17597018800128))),
    ("qcow2", "extended_l2=on", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "extended_l2=on,cluster_size=2M", "0", Ok((6291456, 6291456))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "1", Ok((10485760, 12582912))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "512", Ok((10485760, 12582912))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "1000", Ok((10485760, 12582912))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "65536", Ok((10485760, 12582912))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "1G", Ok((10485760, 1084227584))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "1.5G", Ok((10485760, 1621098496))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "100G", Ok((10485760, 107384668160))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "1T", Ok((16777216, 1099528404992))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "2T", Ok((27262976, 2199050518528))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "16T", Ok((159383552, 17592345427968))),
    ("qcow2", "extended_l2=on,cluster_size=2M", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "0", Ok((49152, 49152))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "1", Ok((81920, 98304))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "512", Ok((81920, 98304))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "1000", Ok((81920, 98304))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "65536", Ok((81920, 147456))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "1G", Ok((1130496, 1074872320))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "1.5G", Ok((1654784, 1612267520))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "100G", Ok((106610688, 107480793088))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "1T", Ok((1091108864, 1100602736640))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "2T", Ok((2182184960, 2201205440512))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "16T", Ok((17457135616, 17609643180032))),
    ("qcow2", "extended_l2=on,cluster_size=16k,refcount_bits=2", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "compat=0.10", "0", Ok((196608, 196608))),
    ("qcow2", "compat=0.10", "1", Ok((327680, 393216))),
    ("qcow2", "compat=0.10", "512", Ok((327680, 393216))),
    ("qcow2", "compat=0.10", "1000", Ok((327680, 393216))),
    ("qcow2", "compat=0.10", "65536", Ok((327680, 393216))),
    ("qcow2", "compat=0.10", "1G", Ok((393216, 1074135040))),
    ("qcow2", "compat=0.10", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "compat=0.10", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "compat=0.10", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "compat=0.10", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "compat=0.10", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "compat=0.10", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "preallocation=full", "0", Ok((196608, 196608))),
    ("qcow2", "preallocation=full", "1", Ok((393216, 393216))),
    ("qcow2", "preallocation=full", "512", Ok((393216, 393216))),
    ("qcow2", "preallocation=full", "1000", Ok((393216, 393216))),
    ("qcow2", "preallocation=full", "65536", Ok((393216, 393216))),
    ("qcow2", "preallocation=full", "1G", Ok((1074135040, 1074135040))),
    ("qcow2", "preallocation=full", "1.5G", Ok((1611071488, 1611071488))),
    ("qcow2", "preallocation=full", "100G", Ok((107390828544, 107390828544))),
    ("qcow2", "preallocation=full", "1T", Ok((1099679662080, 1099679662080))),
    ("qcow2", "preallocation=full", "2T", Ok((2199359062016, 2199359062016))),
    ("qcow2", "preallocation=full", "16T", Ok((17594870988800, 17594870988800))),
    ("qcow2", "preallocation=full", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "preallocation=metadata", "0", Ok((196608, 196608))),
    ("qcow2", "preallocation=metadata", "1", Ok((327680, 393216))),
    ("qcow2", "preallocation=metadata", "512", Ok((327680, 393216))),
    ("qcow2", "preallocation=metadata", "1000", Ok((327680, 393216))),
    ("qcow2", "preallocation=metadata", "65536", Ok((327680, 393216))),
    ("qcow2", "preallocation=metadata", "1G", Ok((393216, 1074135040))),
    ("qcow2", "preallocation=metadata", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "preallocation=metadata", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "preallocation=metadata", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "preallocation=metadata", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "preallocation=metadata", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "preallocation=metadata", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "0", Ok((3145728, 3145728))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "1", Ok((6291456, 6291456))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "512", Ok((6291456, 6291456))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "1000", Ok((6291456, 6291456))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "65536", Ok((6291456, 6291456))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "1G", Ok((1078984704, 1078984704))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "1.5G", Ok((1615855616, 1615855616))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "100G", Ok((107379425280, 107379425280))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "1T", Ok((1099526307840, 1099526307840))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "2T", Ok((2199048421376, 2199048421376))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "16T", Ok((17592358010880, 17592358010880))),
    ("qcow2", "preallocation=falloc,cluster_size=1M", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "backing_file=x", "0", Ok((196608, 196608))),
    ("qcow2", "backing_file=x", "1", Ok((327680, 393216))),
    ("qcow2", "backing_file=x", "512", Ok((327680, 393216))),
    ("qcow2", "backing_file=x", "1000", Ok((327680, 393216))),
    ("qcow2", "backing_file=x", "65536", Ok((327680, 393216))),
    ("qcow2", "backing_file=x", "1G", Ok((393216, 1074135040))),
    ("qcow2", "backing_file=x", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "backing_file=x", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "backing_file=x", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "backing_file=x", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "backing_file=x", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "backing_file=x", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "0", Ok((196608, 196608))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "1", Ok((327680, 393216))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "512", Ok((327680, 393216))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "1000", Ok((327680, 393216))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "65536", Ok((327680, 393216))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "1G", Ok((393216, 1074135040))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "lazy_refcounts=on,compression_type=zstd", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("qcow2", "size=5G", "0", Ok((196608, 196608))),
    ("qcow2", "size=5G", "1", Ok((327680, 393216))),
    ("qcow2", "size=5G", "512", Ok((327680, 393216))),
    ("qcow2", "size=5G", "1000", Ok((327680, 393216))),
    ("qcow2", "size=5G", "65536", Ok((327680, 393216))),
    ("qcow2", "size=5G", "1G", Ok((393216, 1074135040))),
    ("qcow2", "size=5G", "1.5G", Ok((458752, 1611071488))),
    ("qcow2", "size=5G", "100G", Ok((16646144, 107390828544))),
    ("qcow2", "size=5G", "1T", Ok((168034304, 1099679662080))),
    ("qcow2", "size=5G", "2T", Ok((335806464, 2199359062016))),
    ("qcow2", "size=5G", "16T", Ok((2684944384, 17594870988800))),
    ("qcow2", "size=5G", "7E", Err("The image size is too large (try using a larger cluster size)")),
    ("raw", "", "0", Ok((0, 0))),
    ("raw", "", "1", Ok((512, 512))),
    ("raw", "", "512", Ok((512, 512))),
    ("raw", "", "1000", Ok((1024, 1024))),
    ("raw", "", "65536", Ok((65536, 65536))),
    ("raw", "", "1G", Ok((1073741824, 1073741824))),
    ("raw", "", "1.5G", Ok((1610612736, 1610612736))),
    ("raw", "", "100G", Ok((107374182400, 107374182400))),
    ("raw", "", "1T", Ok((1099511627776, 1099511627776))),
    ("raw", "", "2T", Ok((2199023255552, 2199023255552))),
    ("raw", "", "16T", Ok((17592186044416, 17592186044416))),
    ("raw", "", "7E", Ok((8070450532247928832, 8070450532247928832))),
    ("raw", "preallocation=full", "0", Ok((0, 0))),
    ("raw", "preallocation=full", "1", Ok((512, 512))),
    ("raw", "preallocation=full", "512", Ok((512, 512))),
    ("raw", "preallocation=full", "1000", Ok((1024, 1024))),
    ("raw", "preallocation=full", "65536", Ok((65536, 65536))),
    ("raw", "preallocation=full", "1G", Ok((1073741824, 1073741824))),
    ("raw", "preallocation=full", "1.5G", Ok((1610612736, 1610612736))),
    ("raw", "preallocation=full", "100G", Ok((107374182400, 107374182400))),
    ("raw", "preallocation=full", "1T", Ok((1099511627776, 1099511627776))),
    ("raw", "preallocation=full", "2T", Ok((2199023255552, 2199023255552))),
    ("raw", "preallocation=full", "16T", Ok((17592186044416, 17592186044416))),
    ("raw", "preallocation=full", "7E", Ok((8070450532247928832, 8070450532247928832))),
];

fn run(fmt: &str, opts: &str, size: &str) -> core::result::Result<MeasureInfo, MeasureError> {
    let p = parse_target(fmt, (!opts.is_empty()).then_some(opts))?;
    let size = parse_size(size).expect("vector sizes parse");
    let t = target(&p, Some(size), true)?;
    Ok(compute(&t, None))
}

#[test]
fn size_vectors_match_qemu_img() {
    for (fmt, opts, size, want) in SIZE_VECTORS {
        let got = run(fmt, opts, size);
        match want {
            Ok((req, full)) => {
                let m = got.unwrap_or_else(|e| panic!("{fmt} {opts} {size}: {e:?}"));
                assert_eq!(
                    (m.required, m.fully_allocated, m.bitmaps),
                    (*req, *full, None),
                    "{fmt} -o {opts} --size {size}"
                );
            }
            Err(msg) => {
                let lines: Vec<String> = msg.split("\nqemu-img: ").map(String::from).collect();
                assert_eq!(
                    got,
                    Err(MeasureError::Qemu(lines)),
                    "{fmt} -o {opts} --size {size}"
                );
            }
        }
    }
}

#[test]
fn option_errors_match_qemu_img() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("vmdk", "", &["Block driver 'vmdk' does not support size measurement"]),
        ("foo", "", &["Unknown file format 'foo'"]),
        ("bochs", "", &["Format driver 'bochs' does not support image creation"]),
        ("ssh", "", &[
            "Unable to load module ssh. Perhaps you want to install qemu-block-extra or qemu-block-supplemental package?",
            "Unknown file format 'ssh'",
        ]),
        ("qcow2", "bogus=1", &["Invalid parameter 'bogus'", "Invalid options for file format 'qcow2'"]),
        ("qcow2", "help", &["Invalid parameter 'help'", "Invalid options for file format 'qcow2'"]),
        ("raw", "cluster_size=1k", &["Invalid parameter 'cluster_size'", "Invalid options for file format 'raw'"]),
        ("qcow2", "cluster_size=1x", &[
            "Parameter 'cluster_size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
            "Invalid options for file format 'qcow2'",
        ]),
        ("qcow2", "cluster_size=-1", &["Value '-1' is out of range for parameter 'cluster_size'", "Invalid options for file format 'qcow2'"]),
        ("qcow2", "extended_l2=maybe", &["Parameter 'extended_l2' expects 'on' or 'off'", "Invalid options for file format 'qcow2'"]),
        ("qcow2", "refcount_bits=x", &["Parameter 'refcount_bits' expects a number", "Invalid options for file format 'qcow2'"]),
        ("qcow2", "cluster_size=3k", &["Cluster size must be a power of two between 512 and 2048k"]),
        ("qcow2", "extended_l2=on,cluster_size=8k", &["Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"]),
        ("qcow2", "refcount_bits=3", &["Refcount width must be a power of two and may not exceed 64 bits"]),
        ("qcow2", "refcount_bits=0", &["Refcount width must be a power of two and may not exceed 64 bits"]),
        ("qcow2", "refcount_bits=128", &["Refcount width must be a power of two and may not exceed 64 bits"]),
        ("qcow2", "compat=0.10,refcount_bits=8", &["Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"]),
        ("qcow2", "compat=v2", &["Invalid compatibility level: 'v2'"]),
        ("qcow2", "preallocation=bogus", &["invalid parameter value: bogus"]),
        ("qcow2", "encrypt.format=luks", &["Parameter 'encrypt.key-secret' is required for cipher"]),
        ("qcow2", "encryption=on,encrypt.format=luks", &["Parameter 'encrypt.key-secret' is required for cipher"]),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=s0", &["No secret with id 's0'"]),
        ("luks", "", &["Parameter 'key-secret' is required for cipher"]),
        ("luks", "key-secret=s0", &["No secret with id 's0'"]),
        ("luks", "bogus=1", &["Invalid parameter 'bogus'", "Invalid options for file format 'luks'"]),
    ];
    for (fmt, opts, want) in cases {
        let got = parse_target(fmt, (!opts.is_empty()).then_some(*opts))
            .and_then(|p| target(&p, Some(1 << 30), true).map(|_| ()));
        let want: Vec<String> = want.iter().map(|s| String::from(*s)).collect();
        assert_eq!(got, Err(MeasureError::Qemu(want)), "-O {fmt} -o {opts}");
    }
    // Accepted and without effect on the numbers.
    for opts in [
        "lazy_refcounts",
        "noextended_l2",
        "data_file=x",
        "data_file_raw=on",
        "compression_type=foo",
        "encrypt.format=aes",
        "encryption=on",
        "encrypt.key-secret=s0",
        "nocow=on,extent_size_hint=1M",
        "size=5G",
    ] {
        let m = run("qcow2", opts, "1G").unwrap();
        assert_eq!(
            (m.required, m.fully_allocated),
            (393216, 1074135040),
            "{opts}"
        );
    }
    // The last of repeated options wins; `,,` is a literal comma.
    assert_eq!(
        run("qcow2", "cluster_size=4k,cluster_size=8k", "1G")
            .unwrap()
            .fully_allocated,
        1075085312
    );
    assert!(run("qcow2", "cluster_size=4k,,8k", "1G").is_err());
}

#[test]
fn sizes_parse_like_qemu_strtosz() {
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("1.5k"), Ok(1536));
    assert_eq!(parse_size("1.5G"), Ok(1610612736));
    assert_eq!(parse_size("0x10"), Ok(16));
    assert_eq!(parse_size("1b"), Ok(1));
    assert_eq!(parse_size(" 1k"), Ok(1024));
    assert_eq!(parse_size("9223372036854775807"), Ok(i64::MAX as u64));
    for bad in ["1Q", "1e3", "", "1.5", "1KiB", "0x10k", "k"] {
        assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
    }
    for range in ["-1", "99999999999999999999", "16E"] {
        assert_eq!(parse_size(range), Err(SizeError::Range), "{range}");
    }
}

#[test]
fn data_rounds_to_target_clusters() {
    // Each target cluster with any data byte counts once.
    let d = [(0, 4096), (8192, 12288), (65536, 65537), (200000, 300000)];
    assert_eq!(
        data_clusters_bytes(&d, 65536),
        65536 * 2 + (327680 - 196608)
    );
    assert_eq!(data_clusters_bytes(&[], 65536), 0);
}

#[test]
fn bitmaps_size_matches_iotest_190() {
    // qemu's iotest 190: 2 TiB image, bitmaps of granularity 512 and 2M,
    // named "b1" and "b2", measured for 64k and 2M clusters.
    let two_t = 2u64 << 40;
    let b = [(2usize, 512u64), (2, 2 << 20)];
    assert_eq!(bitmaps_size(two_t, &b, 65536), 537198592);
    assert_eq!(bitmaps_size(two_t, &b, 2 << 20), 545259520);
}
