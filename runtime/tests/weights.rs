//! Tests of `kiln_runtime::weights`: round trips through real safetensors files, conversions,
//! shards, binding a graph's parameters, and every kind of broken file, each of which must be
//! an error with a clear message (never a panic).

use kiln_ir::{DType, Dim, Graph, TensorType};
use kiln_kernels::convert;
use kiln_runtime::{Checkpoint, Convert, Storage, Tensor, WeightsError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A file under the temp dir with a unique name, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-weights-{}-{}-{tag}.safetensors",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A valid safetensors file made by the `safetensors` crate.
fn st_file(tensors: &[(&str, Dtype, &[usize], Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.to_vec(), data).expect("consistent view");
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// A file from a header written by hand and raw data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    convert::encode_f32(dtype, values, &mut out).expect("float dtype");
    out
}

fn st_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::F8E5M2 => Dtype::F8_E5M2,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

/// The little-endian bytes of a tensor's elements (bit exact, NaN payloads included).
fn storage_bytes(storage: &Storage) -> Vec<u8> {
    match storage {
        Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::F8E4M3(v) | Storage::F8E5M2(v) | Storage::U8(v) => v.clone(),
        Storage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
    }
}

/// Deterministic bytes covering every bit pattern class (NaNs, infinities, subnormals).
fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Opens a file that must be refused as malformed; checks the whole message.
fn expect_format(tag: &str, bytes: &[u8], message: &str) {
    let file = TempFile::new(tag, bytes);
    match Checkpoint::open(file.path()) {
        Err(e @ WeightsError::Format { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "{} is not a valid safetensors file: {message}",
                file.path().display()
            ),
            "{tag}"
        ),
        other => panic!("{tag}: expected a format error, got {other:?}"),
    }
}

fn graph_with(params: &[(&str, TensorType)]) -> Graph {
    let mut g = Graph::new();
    for (name, ty) in params {
        g.param(name, ty.clone());
    }
    g
}

#[test]
fn round_trip_every_dtype() {
    let shapes: [&[usize]; 3] = [&[2, 3], &[], &[0, 5]];
    let mut tensors = Vec::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for (j, shape) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product::<usize>() * dtype.size_bytes();
            let mut data = pattern(n, (i * 7 + j) as u64 + 1);
            if dtype == DType::Bool {
                data.iter_mut().for_each(|b| *b &= 1);
            }
            let name = format!("{}.{j}", dtype.name());
            tensors.push((name, dtype, *shape, data));
        }
    }
    // NaN and signed zero survive bit for bit.
    let specials = [
        f32::NAN,
        -f32::NAN,
        -0.0,
        f32::INFINITY,
        f32::from_bits(0x7f80_0001),
    ];
    let special_bytes = f32_bytes(DType::F32, &specials);
    let table: Vec<(&str, Dtype, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| (name.as_str(), st_dtype(*dtype), *shape, data.clone()))
        .chain([("specials", Dtype::F32, &[5usize][..], special_bytes.clone())])
        .collect();
    let file = TempFile::new("round-trip", &st_file(&table));
    let ckpt = Checkpoint::open(file.path()).expect("open");
    fn shareable<T: Send + Sync>(_: &T) {}
    shareable(&ckpt);

    let mut names: Vec<&str> = ckpt.names().collect();
    assert_eq!(names.len(), 28);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "names are sorted");
    names.sort_unstable();
    assert_eq!(ckpt.paths().collect::<Vec<_>>(), [file.path()]);

    for (name, dtype, shape, data) in &tensors {
        assert_eq!(ckpt.info(name), Some((*dtype, shape.to_vec())), "{name}");
        let t = ckpt.load(name).expect("load");
        assert_eq!(t.dtype(), *dtype, "{name}");
        assert_eq!(t.shape(), *shape, "{name}");
        assert_eq!(&storage_bytes(t.storage()), data, "{name}");
        // load_as to its own dtype is the same as load.
        let same = ckpt.load_as(name, *dtype).expect("load_as");
        assert_eq!(storage_bytes(same.storage()), *data, "{name}");
    }
    let t = ckpt.load("specials").unwrap();
    assert_eq!(storage_bytes(t.storage()), special_bytes);
    assert!(t.as_f32().unwrap()[0].is_nan());
}

#[test]
fn dtypes_kiln_lacks_are_reported_on_load() {
    let file = TempFile::new(
        "unsupported",
        &st_file(&[
            ("double", Dtype::F64, &[2], vec![0; 16]),
            ("small", Dtype::I8, &[3], vec![1, 2, 3]),
            ("ok", Dtype::U8, &[1], vec![7]),
        ]),
    );
    let ckpt = Checkpoint::open(file.path()).expect("a file with F64 opens");
    assert_eq!(ckpt.names().collect::<Vec<_>>(), ["double", "ok", "small"]);
    assert_eq!(ckpt.info("double"), None);
    assert_eq!(ckpt.info("ok"), Some((DType::U8, vec![1])));
    let err = ckpt.load("double").unwrap_err();
    assert!(matches!(err, WeightsError::UnsupportedDtype { ref dtype, .. } if dtype == "F64"));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor \"double\" has dtype F64, which kiln does not support (it reads F32, F16, \
             BF16, F8_E4M3, F8_E5M2, I64, I32, U8 and BOOL)",
            file.path().display()
        )
    );
    assert!(matches!(
        ckpt.load_as("small", DType::I64),
        Err(WeightsError::UnsupportedDtype { .. })
    ));
}

#[test]
fn load_as_converts_floats_and_widens_integers() {
    let values = [
        1.0f32 / 3.0,
        -2.25,
        1e6,
        3e-5,
        f32::INFINITY,
        500.0,
        -0.0,
        65519.0,
    ];
    let n = [values.len()];
    let file = TempFile::new(
        "load-as",
        &st_file(&[
            ("f32", Dtype::F32, &n, f32_bytes(DType::F32, &values)),
            ("bf16", Dtype::BF16, &n, f32_bytes(DType::BF16, &values)),
            ("f16", Dtype::F16, &n, f32_bytes(DType::F16, &values)),
            (
                "e4m3",
                Dtype::F8_E4M3,
                &n,
                f32_bytes(DType::F8E4M3, &values),
            ),
            (
                "i32",
                Dtype::I32,
                &[3],
                [-7i32, 0, i32::MAX]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            ("u8", Dtype::U8, &[2], vec![0, 255]),
            ("i64", Dtype::I64, &[1], 5i64.to_le_bytes().to_vec()),
        ]),
    );
    let ckpt = Checkpoint::open(file.path()).unwrap();
    let f32t = ckpt.load("f32").unwrap();

    // f32 -> bf16 -> f32 rounds once, exactly as a cast.
    let bf = ckpt.load_as("f32", DType::BF16).unwrap();
    assert_eq!(bf, f32t.cast(DType::BF16));
    assert_eq!(bf.get(0), kiln_ir::Scalar::Float(0.333984375));
    assert_eq!(
        ckpt.load_as("bf16", DType::F32).unwrap(),
        bf.cast(DType::F32)
    );
    assert_eq!(ckpt.load("bf16").unwrap(), bf);

    // Every float pair agrees with Tensor::cast of the exact load.
    for from in ["f32", "bf16", "f16", "e4m3"] {
        let exact = ckpt.load(from).unwrap();
        for to in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F8E4M3,
            DType::F8E5M2,
        ] {
            let got = ckpt.load_as(from, to).unwrap();
            let want = exact.cast(to);
            assert_eq!(got.dtype(), to);
            assert_eq!(
                storage_bytes(got.storage()),
                storage_bytes(want.storage()),
                "{from} -> {to}"
            );
        }
    }
    assert_eq!(
        ckpt.load_as("f32", DType::F8E4M3).unwrap().get(2),
        kiln_ir::Scalar::Float(448.0),
        "e4m3 saturates like torch"
    );

    assert_eq!(
        ckpt.load_as("i32", DType::I64).unwrap().as_i64().unwrap(),
        &[-7, 0, i64::from(i32::MAX)]
    );
    assert_eq!(
        ckpt.load_as("u8", DType::I64).unwrap().as_i64().unwrap(),
        &[0, 255]
    );
    assert_eq!(
        ckpt.load_as("u8", DType::I32).unwrap().storage(),
        &Storage::I32(vec![0, 255])
    );

    for (name, to) in [
        ("i64", DType::F32),
        ("f32", DType::I64),
        ("i64", DType::I32),
        ("u8", DType::Bool),
    ] {
        let err = ckpt.load_as(name, to).unwrap_err();
        assert!(
            matches!(&err, WeightsError::DtypeMismatch { expected, .. } if *expected == to),
            "{err:?}"
        );
    }
    assert_eq!(
        ckpt.load_as("i64", DType::F32).unwrap_err().to_string(),
        format!(
            "{}: tensor \"i64\" has dtype i64 and cannot be loaded as f32: only float dtypes \
             convert among each other, and integers only widen (u8 to i32 or i64, i32 to i64)",
            file.path().display()
        )
    );
    let missing = ckpt.load("nope").unwrap_err();
    assert!(matches!(missing, WeightsError::Missing { .. }));
    assert_eq!(
        missing.to_string(),
        format!("no tensor \"nope\" in {}", file.path().display())
    );
}

#[test]
fn shards_open_together() {
    let a = TempFile::new(
        "shard-a",
        &st_file(&[
            (
                "layers.0.w",
                Dtype::F32,
                &[2],
                f32_bytes(DType::F32, &[1.0, 2.0]),
            ),
            ("embed", Dtype::BF16, &[1], f32_bytes(DType::BF16, &[3.0])),
        ]),
    );
    let b = TempFile::new(
        "shard-b",
        &st_file(&[(
            "layers.1.w",
            Dtype::F32,
            &[2],
            f32_bytes(DType::F32, &[4.0, 5.0]),
        )]),
    );
    let paths = [a.path().to_path_buf(), b.path().to_path_buf()];
    let ckpt = Checkpoint::open_many(&paths).expect("open shards");
    assert_eq!(
        ckpt.names().collect::<Vec<_>>(),
        ["embed", "layers.0.w", "layers.1.w"]
    );
    assert_eq!(
        ckpt.load("layers.1.w").unwrap().as_f32().unwrap(),
        &[4.0, 5.0]
    );
    assert_eq!(
        ckpt.load_as("embed", DType::F32).unwrap().as_f32().unwrap(),
        &[3.0]
    );
    assert_eq!(ckpt.info("layers.0.w"), Some((DType::F32, vec![2])));

    let err = ckpt.load("layers.2.w").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no tensor \"layers.2.w\" in any of the 2 files {}, {}",
            a.path().display(),
            b.path().display()
        )
    );

    let empty = Checkpoint::open_many(&[]).unwrap();
    assert_eq!(empty.names().count(), 0);
    assert_eq!(
        empty.load("x").unwrap_err().to_string(),
        "no tensor \"x\" in the checkpoint (it has no files)"
    );
}

#[test]
fn a_name_in_two_shards_is_an_error() {
    let a = TempFile::new("dup-a", &st_file(&[("w", Dtype::U8, &[1], vec![1])]));
    let b = TempFile::new(
        "dup-b",
        &st_file(&[
            ("v", Dtype::U8, &[1], vec![2]),
            ("w", Dtype::U8, &[1], vec![3]),
        ]),
    );
    let err = Checkpoint::open_many(&[a.path().to_path_buf(), b.path().to_path_buf()]).unwrap_err();
    match &err {
        WeightsError::Duplicate { name, paths } => {
            assert_eq!(name, "w");
            assert_eq!(paths, &[a.path().to_path_buf(), b.path().to_path_buf()]);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "tensor \"w\" is in more than one file of the checkpoint: {} and {}",
            a.path().display(),
            b.path().display()
        )
    );
    // The same file twice.
    let err = Checkpoint::open_many(&[a.path().to_path_buf(), a.path().to_path_buf()]).unwrap_err();
    assert!(matches!(err, WeightsError::Duplicate { .. }));
}

#[test]
fn bind_loads_every_parameter() {
    let w: Vec<f32> = (0..64 * 128).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..128).map(|i| -(i as f32)).collect();
    let file = TempFile::new(
        "bind",
        &st_file(&[
            (
                "lm_head.weight",
                Dtype::F32,
                &[64, 128],
                f32_bytes(DType::F32, &w),
            ),
            (
                "lm_head.bias",
                Dtype::BF16,
                &[128],
                f32_bytes(DType::BF16, &b),
            ),
            ("unused", Dtype::F64, &[1], vec![0; 8]),
        ]),
    );
    let ckpt = Checkpoint::open(file.path()).unwrap();
    let graph = graph_with(&[
        ("lm_head.weight", TensorType::new(DType::F32, [64i64, 128])),
        ("lm_head.bias", TensorType::new(DType::BF16, [128i64])),
    ]);
    for policy in [Convert::Exact, Convert::Cast] {
        let bound = ckpt.bind(&graph, policy).expect("bind");
        assert_eq!(bound.len(), 2);
        assert_eq!(
            bound["lm_head.weight"],
            Tensor::from_f32(vec![64, 128], w.clone()).unwrap()
        );
        assert_eq!(bound["lm_head.bias"].dtype(), DType::BF16);
        assert_eq!(
            bound["lm_head.bias"].cast(DType::F32).as_f32().unwrap(),
            b.as_slice()
        );
    }

    // Cast converts a bf16 tensor for an f32 (or fp8) parameter.
    let graph = graph_with(&[
        ("lm_head.bias", TensorType::new(DType::F32, [128i64])),
        (
            "lm_head.weight",
            TensorType::new(DType::F8E5M2, [64i64, 128]),
        ),
    ]);
    let bound = ckpt.bind(&graph, Convert::Cast).unwrap();
    assert_eq!(bound["lm_head.bias"].as_f32().unwrap(), b.as_slice());
    assert_eq!(
        bound["lm_head.weight"],
        Tensor::from_f32(vec![64, 128], w)
            .unwrap()
            .cast(DType::F8E5M2)
    );

    // A graph without parameters binds nothing.
    assert!(ckpt.bind(&Graph::new(), Convert::Exact).unwrap().is_empty());
}

#[test]
fn bind_refuses_a_different_dtype_under_exact() {
    let file = TempFile::new(
        "bind-dtype",
        &st_file(&[
            ("w", Dtype::BF16, &[64, 128], vec![0; 64 * 128 * 2]),
            ("ids", Dtype::I64, &[4], vec![0; 32]),
        ]),
    );
    let ckpt = Checkpoint::open(file.path()).unwrap();
    let graph = graph_with(&[("w", TensorType::new(DType::F32, [64i64, 128]))]);
    let err = ckpt.bind(&graph, Convert::Exact).unwrap_err();
    match &err {
        WeightsError::DtypeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(
                (name.as_str(), *expected, found.as_str()),
                ("w", DType::F32, "bf16")
            );
        }
        other => panic!("expected DtypeMismatch, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor \"w\" has dtype bf16 but the model expects f32 (binding with \
             Convert::Cast would convert it)",
            file.path().display()
        )
    );
    // No conversion from an integer tensor to a float parameter, even under Cast.
    let graph = graph_with(&[("ids", TensorType::new(DType::F32, [4i64]))]);
    let err = ckpt.bind(&graph, Convert::Cast).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor \"ids\" has dtype i64 but the model expects f32, and there is no \
             conversion: only float dtypes convert among each other, and integers only widen \
             (u8 to i32 or i64, i32 to i64)",
            file.path().display()
        )
    );
}

#[test]
fn bind_refuses_a_different_shape() {
    let file = TempFile::new(
        "bind-shape",
        &st_file(&[(
            "lm_head.weight",
            Dtype::F32,
            &[64, 128],
            vec![0; 64 * 128 * 4],
        )]),
    );
    let ckpt = Checkpoint::open(file.path()).unwrap();
    for (expected, printed) in [
        (vec![128i64, 64], "[128, 64]"),
        (vec![64 * 128], "[8192]"),
        (vec![1, 64, 128], "[1, 64, 128]"),
    ] {
        let graph = graph_with(&[("lm_head.weight", TensorType::new(DType::F32, expected))]);
        let err = ckpt.bind(&graph, Convert::Cast).unwrap_err();
        assert!(
            matches!(&err, WeightsError::ShapeMismatch { expected, found, .. }
                if expected == printed && found == "[64, 128]"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{}: tensor \"lm_head.weight\" has shape [64, 128] but the model expects {printed}",
                file.path().display()
            )
        );
    }
}

#[test]
fn bind_reports_a_missing_tensor_and_symbolic_shapes() {
    let file = TempFile::new(
        "bind-missing",
        &st_file(&[("w", Dtype::F32, &[2], vec![0; 8])]),
    );
    let ckpt = Checkpoint::open(file.path()).unwrap();
    let graph = graph_with(&[
        ("w", TensorType::new(DType::F32, [2i64])),
        ("b", TensorType::new(DType::F32, [2i64])),
    ]);
    let err = ckpt.bind(&graph, Convert::Exact).unwrap_err();
    assert!(matches!(&err, WeightsError::Missing { name, .. } if name == "b"));
    assert_eq!(
        err.to_string(),
        format!("no tensor \"b\" in {}", file.path().display())
    );

    let graph = graph_with(&[(
        "w",
        TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(2)]),
    )]);
    let err = ckpt.bind(&graph, Convert::Exact).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Symbolic { name, ty } if name == "w" && ty == "f32[seq, 2]")
    );
    assert_eq!(
        err.to_string(),
        "parameter \"w\" has type f32[seq, 2], whose shape is not fixed; only parameters with \
         fixed shapes can be bound from a checkpoint"
    );
}

#[test]
fn nonexistent_file() {
    let path = std::env::temp_dir().join(format!(
        "kiln-weights-{}-absent.safetensors",
        std::process::id()
    ));
    let err = Checkpoint::open(&path).unwrap_err();
    match &err {
        WeightsError::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", path.display())),
        "{err}"
    );
}

#[test]
fn empty_and_short_files() {
    expect_format("empty", &[], "the file is empty");
    expect_format(
        "short",
        &[1, 0, 0, 0, 0],
        "the file is only 5 bytes long, too short for the 8-byte header length that starts \
         every safetensors file",
    );
}

#[test]
fn header_length_beyond_the_file() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    expect_format(
        "header-too-long",
        &bytes,
        "its first 8 bytes give a header length of 1000 bytes, but only 2 bytes follow \
         (truncated, or not a safetensors file?)",
    );
    // A zip archive (a PyTorch .bin) read as a safetensors file.
    let mut zip = b"PK\x03\x04\x14\x00\x00\x00".to_vec();
    zip.extend_from_slice(&[0; 40]);
    expect_format(
        "zip",
        &zip,
        &format!(
            "its first 8 bytes give a header length of {} bytes, but only 40 bytes follow \
             (truncated, or not a safetensors file?)",
            u64::from_le_bytes(*b"PK\x03\x04\x14\x00\x00\x00")
        ),
    );
}

#[test]
fn header_over_the_safetensors_limit() {
    // A sparse file: 8-byte length prefix claiming 150 MB of header, then zeros.
    let file = TempFile::new("huge-header", &150_000_000u64.to_le_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .and_then(|f| f.set_len(8 + 150_000_000))
        .unwrap();
    let err = Checkpoint::open(file.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not a valid safetensors file: the header is 150000000 bytes long, more than \
             the 100000000 bytes safetensors allows",
            file.path().display()
        )
    );
}

#[test]
fn header_not_utf8_or_not_json() {
    expect_format(
        "not-utf8",
        &[&4u64.to_le_bytes()[..], b"{\"\xff\""].concat(),
        "the header is not UTF-8 text: invalid utf-8 sequence of 1 bytes from index 2",
    );
    expect_format(
        "not-json",
        &raw_file("hello, world", &[]),
        "the header is not valid JSON: expected value at line 1 column 1",
    );
    expect_format(
        "cut-json",
        &raw_file(r#"{"a": {"dtype": "F32", "shape": [1], "data_"#, &[0; 4]),
        "the header is not valid JSON: EOF while parsing a string at line 1 column 43",
    );
    expect_format(
        "list",
        &raw_file("[1, 2]", &[]),
        "the header is a list, not an object mapping tensor names to their dtype, shape and \
         offsets",
    );
    // serde_json's recursion limit (128 levels) refuses deep nesting, at the top level or in an
    // entry, closed or not, without exhausting the stack.
    expect_format(
        "deep",
        &raw_file(&"[".repeat(10_000), &[]),
        "the header is not valid JSON: recursion limit exceeded at line 1 column 128",
    );
    let closed = format!(r#"{{"a":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    expect_format(
        "deep-entry",
        &raw_file(&closed, &[]),
        "the header is not valid JSON: recursion limit exceeded at line 1 column 132",
    );
}

#[test]
fn header_entries_of_the_wrong_form() {
    let cases = [
        (
            "unknown-dtype",
            r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
            r#"tensor "a" has dtype "F99", which is not a safetensors dtype"#,
        ),
        (
            "no-shape",
            r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#,
            r#"the header entry for tensor "a" has no "shape""#,
        ),
        (
            "not-object",
            r#"{"a":[0,4]}"#,
            r#"the header entry for tensor "a" is a list, not an object"#,
        ),
        (
            "float-dim",
            r#"{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
            r#"tensor "a" has shape [1.0], which is not a list of non-negative integers"#,
        ),
        (
            "huge-dim",
            r#"{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}}"#,
            r#"tensor "a" has shape [1.8446744073709552e+19], which is not a list of non-negative integers"#,
        ),
        (
            "long-shape",
            r#"{"a":{"dtype":"F32","shape":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,-1],"data_offsets":[0,4]}}"#,
            r#"tensor "a" has shape [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1..., which is not a list of non-negative integers"#,
        ),
        (
            "three-offsets",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            r#"tensor "a" has data_offsets [0, 4, 8], which is not a pair of non-negative integers [start, end]"#,
        ),
        (
            "duplicate-key",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"the header lists "a" twice"#,
        ),
        (
            "escaped-duplicate",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\u0061":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"the header lists "a" twice"#,
        ),
        (
            // serde_json keeps the last of a repeated field; the safetensors crate's own check
            // then refuses the repeat.
            "duplicate-field",
            r#"{"a":{"dtype":"F16","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            "the header is not valid safetensors JSON: duplicate field `dtype` at line 1 column 68",
        ),
        (
            "bad-metadata",
            r#"{"__metadata__":{"format":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"the header's "__metadata__" must map names to strings, but it is {"format": 1}"#,
        ),
        (
            "sub-byte",
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            r#"tensor "a" (F4 with shape [3]) does not fill a whole number of bytes"#,
        ),
    ];
    for (tag, header, message) in cases {
        expect_format(tag, &raw_file(header, &[0; 4]), message);
    }
    // Valid metadata is accepted.
    let ok = TempFile::new(
        "metadata",
        &raw_file(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#,
            &1.5f32.to_le_bytes(),
        ),
    );
    let ckpt = Checkpoint::open(ok.path()).unwrap();
    assert_eq!(ckpt.load("a").unwrap().as_f32().unwrap(), &[1.5]);
}

#[test]
fn truncated_data_section() {
    let bytes = st_file(&[
        ("a", Dtype::F32, &[2], vec![0; 8]),
        ("b", Dtype::F32, &[4], vec![0; 16]),
    ]);
    expect_format(
        "truncated",
        &bytes[..bytes.len() - 10],
        "the header claims 24 bytes of data but the file has 14 (truncated?); tensor \"b\" lies \
         at bytes 8..24 of the data",
    );
}

#[test]
fn offsets_past_the_end() {
    expect_format(
        "past-end",
        &raw_file(
            r#"{"lm_head.weight":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#,
            &[0; 200],
        ),
        "the header claims 1000 bytes of data but the file has 200 (truncated?); tensor \
         \"lm_head.weight\" lies at bytes 0..1000 of the data",
    );
}

#[test]
fn offsets_whose_size_disagrees_with_dtype_and_shape() {
    expect_format(
        "size",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
            &[0; 20],
        ),
        "tensor \"w\" is F32 with shape [2, 3], which takes 24 bytes, but its data_offsets \
         [0, 20] span 20 bytes",
    );
}

#[test]
fn element_count_overflow() {
    expect_format(
        "numel",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
            &[],
        ),
        "tensor \"w\" has shape [4294967296, 4294967296], which has more elements than can be \
         addressed",
    );
    // 2^63 bytes: the element count fits but the size in bits does not.
    expect_format(
        "nbits",
        &raw_file(
            r#"{"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}}"#,
            &[],
        ),
        "tensor \"w\" has shape [9223372036854775808], which has more elements than can be \
         addressed",
    );
}

#[test]
fn offsets_summing_past_usize_do_not_panic() {
    // Eight consistent tensors of 2^61 - 1 bytes each: the data section they claim is
    // 2^64 - 8 bytes. safetensors 0.6.2 adds that to the header length unchecked and panics
    // with "attempt to add with overflow" in debug builds; kiln refuses the file first.
    let size: u64 = (1 << 61) - 1;
    let entries: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{},{}]}}"#,
                i * size,
                (i + 1) * size
            )
        })
        .collect();
    expect_format(
        "sum-overflow",
        &raw_file(&format!("{{{}}}", entries.join(",")), &[0; 16]),
        &format!(
            "the header claims {} bytes of data but the file has 16 (truncated?); tensor \"t7\" \
             lies at bytes {}..{} of the data",
            8 * size,
            7 * size,
            8 * size
        ),
    );
}

#[test]
fn overlapping_negative_and_reversed_offsets() {
    expect_format(
        "overlap",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            &[0; 24],
        ),
        "tensors \"a\" (bytes 0..16) and \"b\" (bytes 8..24) overlap",
    );
    expect_format(
        "alias",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ),
        "tensors \"a\" (bytes 0..16) and \"b\" (bytes 0..16) overlap",
    );
    expect_format(
        "negative",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[-8,8]}}"#,
            &[0; 16],
        ),
        "tensor \"a\" has data_offsets [-8, 8], which is not a pair of non-negative integers \
         [start, end]",
    );
    expect_format(
        "reversed",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
            &[0; 8],
        ),
        "tensor \"a\" has data_offsets [8, 0], which end before they start",
    );
    expect_format(
        "gap",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ),
        "bytes 0..4 of the data lie before the first tensor \"a\" and belong to no tensor \
         (safetensors data has no gaps)",
    );
    expect_format(
        "gap-between",
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[0; 12],
        ),
        "bytes 4..8 of the data lie between tensors \"a\" and \"b\" and belong to no tensor \
         (safetensors data has no gaps)",
    );
}

#[test]
fn trailing_bytes_after_the_data() {
    let mut bytes = st_file(&[("a", Dtype::F32, &[6], vec![0; 24])]);
    bytes.extend_from_slice(&[0; 4]);
    expect_format(
        "trailing",
        &bytes,
        "the file has 28 bytes of data but the header accounts for only 24; the last 4 bytes \
         belong to no tensor",
    );
}

#[test]
fn empty_header_is_an_empty_checkpoint() {
    let file = TempFile::new("empty-header", &raw_file("{}", &[]));
    let ckpt = Checkpoint::open(file.path()).unwrap();
    assert_eq!(ckpt.names().count(), 0);
    // A header padded with spaces, as the safetensors crate writes it.
    let file = TempFile::new("padded", &raw_file("{}      ", &[]));
    assert!(Checkpoint::open(file.path()).is_ok());
}
