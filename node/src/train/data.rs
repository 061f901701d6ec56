//! Datasets from their real on-disk formats, detected from the files in a
//! directory: IDX (MNIST, Fashion-MNIST; gzipped or not) and the CIFAR-10
//! binary format. Every check names the file and what is wrong with it; a bad
//! file is an error, never a panic.
//!
//! A dataset is identified by the blake3 of its decoded contents (train and
//! test images and labels), so the same data gzipped or not has the same id.

use p2p_proto::Hash;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Debian's `dataset-fashion-mnist` package puts the real Fashion-MNIST here.
pub const DEFAULT_DATASET_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Largest decoded file accepted: far above CIFAR-10's 30 MiB per batch, and a
/// guard against a compressed file that expands without end.
const MAX_DECODED_BYTES: u64 = 1 << 30;

const CLASSES: usize = 10;
const CIFAR_TRAIN: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
const CIFAR_TEST: &str = "test_batch.bin";
const CIFAR_IMAGE: usize = 3 * 32 * 32;

/// Why a dataset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "no dataset in {dir}: expected IDX files (train-images-idx3-ubyte[.gz] and the like) or CIFAR-10 binary \
         files (data_batch_1.bin ... test_batch.bin); for Fashion-MNIST install Debian's dataset-fashion-mnist package \
         and use --dataset {DEFAULT_DATASET_DIR}"
    )]
    NotFound { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

fn bad(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Bad { path: path.to_owned(), reason: reason.into() }
}

/// The file formats this loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Idx,
    Cifar10,
}

/// One split: images as bytes in `C×H×W` order, one label per image.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` samples (a real subset, for short runs and tests).
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.len());
        let per = self.images.len() / self.len().max(1);
        Split { images: self.images[..n * per].to_vec(), labels: self.labels[..n].to_vec() }
    }
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format: Format,
    /// Channels, height, width of one image.
    pub shape: [usize; 3],
    pub classes: usize,
    pub train: Split,
    pub test: Split,
    /// blake3 of the decoded contents.
    pub hash: Hash,
}

impl Dataset {
    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Loads the dataset in `dir`, detecting its format from the file names.
pub fn load(dir: &Path) -> Result<Dataset, DataError> {
    if find(dir, "train-images-idx3-ubyte").is_some() {
        load_idx(dir)
    } else if dir.join(CIFAR_TRAIN[0]).exists() {
        load_cifar(dir)
    } else {
        Err(DataError::NotFound { dir: dir.to_owned() })
    }
}

/// `name` or `name.gz` in `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))].into_iter().find(|p| p.exists())
}

/// Reads a file, gunzipping it if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("corrupt gzip data: {e}")))?;
        if out.len() as u64 > MAX_DECODED_BYTES {
            return Err(bad(path, format!("decompresses to more than {MAX_DECODED_BYTES} bytes")));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes with `ndim` dimensions.
fn parse_idx(path: &Path, bytes: &[u8], ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.len() < 4 {
        return Err(bad(path, format!("{} bytes is too short for an IDX header", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(path, "not an IDX file: the magic number must start with two zero bytes"));
    }
    if bytes[2] != 0x08 {
        return Err(bad(path, format!("IDX element type 0x{:02x} is not unsigned bytes (0x08)", bytes[2])));
    }
    if bytes[3] as usize != ndim {
        return Err(bad(path, format!("IDX file has {} dimensions, expected {ndim}", bytes[3])));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad(path, format!("truncated IDX header: {} of {header} bytes", bytes.len())));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize).collect();
    if dims.contains(&0) {
        return Err(bad(path, format!("IDX header {dims:?} announces no data: every dimension must be at least 1")));
    }
    let want =
        dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).ok_or_else(|| bad(path, "IDX dimensions overflow"))?;
    let have = bytes.len() - header;
    if have != want {
        return Err(bad(
            path,
            format!(
                "IDX data holds {have} bytes but its header {dims:?} announces {want}: the file is truncated or padded"
            ),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn check_labels(path: &Path, labels: &[u8]) -> Result<(), DataError> {
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= CLASSES) {
        return Err(bad(path, format!("label {l} at index {i} is not a class in 0..{CLASSES}")));
    }
    Ok(())
}

fn idx_split(dir: &Path, prefix: &str) -> Result<(Split, [usize; 2]), DataError> {
    let missing = |name: &str| DataError::Io {
        path: dir.join(name),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "file missing (plain or .gz)"),
    };
    let ip = find(dir, &format!("{prefix}-images-idx3-ubyte"))
        .ok_or_else(|| missing(&format!("{prefix}-images-idx3-ubyte")))?;
    let lp = find(dir, &format!("{prefix}-labels-idx1-ubyte"))
        .ok_or_else(|| missing(&format!("{prefix}-labels-idx1-ubyte")))?;
    let (idims, images) = parse_idx(&ip, &read_maybe_gz(&ip)?, 3)?;
    let (ldims, labels) = parse_idx(&lp, &read_maybe_gz(&lp)?, 1)?;
    if idims[0] != ldims[0] {
        return Err(bad(&lp, format!("{} labels for {} images in {}", ldims[0], idims[0], ip.display())));
    }
    check_labels(&lp, &labels)?;
    Ok((Split { images, labels }, [idims[1], idims[2]]))
}

fn load_idx(dir: &Path) -> Result<Dataset, DataError> {
    let (train, hw) = idx_split(dir, "train")?;
    let (test, thw) = idx_split(dir, "t10k")?;
    if hw != thw {
        return Err(bad(dir, format!("train images are {hw:?} but test images are {thw:?}")));
    }
    Ok(finish(Format::Idx, [1, hw[0], hw[1]], train, test))
}

fn cifar_file(path: &Path) -> Result<Split, DataError> {
    let bytes = read_maybe_gz(path)?;
    let rec = 1 + CIFAR_IMAGE;
    if bytes.is_empty() || bytes.len() % rec != 0 {
        return Err(bad(
            path,
            format!(
                "{} bytes is not a whole number of CIFAR-10 records ({rec} bytes: a label and a 32x32x3 image)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut split = Split { images: Vec::with_capacity(n * CIFAR_IMAGE), labels: Vec::with_capacity(n) };
    for r in bytes.chunks_exact(rec) {
        split.labels.push(r[0]);
        split.images.extend_from_slice(&r[1..]);
    }
    check_labels(path, &split.labels)?;
    Ok(split)
}

fn load_cifar(dir: &Path) -> Result<Dataset, DataError> {
    let mut train = Split { images: Vec::new(), labels: Vec::new() };
    for name in CIFAR_TRAIN {
        let part = cifar_file(&dir.join(name))?;
        train.images.extend(part.images);
        train.labels.extend(part.labels);
    }
    let test = cifar_file(&dir.join(CIFAR_TEST))?;
    Ok(finish(Format::Cifar10, [3, 32, 32], train, test))
}

fn finish(format: Format, shape: [usize; 3], train: Split, test: Split) -> Dataset {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/dataset/v1");
    for v in shape {
        h.update(&(v as u64).to_le_bytes());
    }
    for s in [&train, &test] {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(&s.labels);
        h.update(&s.images);
    }
    Dataset { format, shape, classes: CLASSES, train, test, hash: *h.finalize().as_bytes() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dtrain-data-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write_idx_set(dir: &Path, compress: bool) {
        let img: Vec<u8> = (0..3 * 4 * 4).map(|i| i as u8).collect();
        let files = [
            ("train-images-idx3-ubyte", idx(&[3, 4, 4], &img)),
            ("train-labels-idx1-ubyte", idx(&[3], &[0, 9, 4])),
            ("t10k-images-idx3-ubyte", idx(&[1, 4, 4], &img[..16])),
            ("t10k-labels-idx1-ubyte", idx(&[1], &[2])),
        ];
        for (name, bytes) in files {
            if compress {
                std::fs::write(dir.join(format!("{name}.gz")), gz(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn idx_plain_and_gzipped_load_the_same_data_and_hash() {
        let (a, b) = (tmp("plain"), tmp("gz"));
        write_idx_set(&a, false);
        write_idx_set(&b, true);
        let (da, db) = (load(&a).unwrap(), load(&b).unwrap());
        assert_eq!(da.format, Format::Idx);
        assert_eq!(da.shape, [1, 4, 4]);
        assert_eq!(da.train.labels, vec![0, 9, 4]);
        assert_eq!(da.train.images.len(), 48);
        assert_eq!(da.hash, db.hash);
        std::fs::remove_dir_all(a).unwrap();
        std::fs::remove_dir_all(b).unwrap();
    }

    #[test]
    fn truncated_and_wrong_files_name_the_file_and_the_fault() {
        let d = tmp("bad");
        write_idx_set(&d, false);
        let f = d.join("train-images-idx3-ubyte");
        let good = std::fs::read(&f).unwrap();
        std::fs::write(&f, &good[..good.len() - 5]).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte") && e.contains("truncated"), "{e}");
        std::fs::write(&f, [1, 2, 3]).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        std::fs::write(&f, &good).unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx(&[3], &[0, 10, 1])).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("label 10 at index 1"), "{e}");
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx(&[2], &[0, 1])).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("2 labels for 3 images"), "{e}");
        // A split of no images (or images of no pixels) is refused, naming the file.
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx(&[0], &[])).unwrap();
        std::fs::write(&f, idx(&[0, 4, 4], &[])).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte") && e.contains("announces no data"), "{e}");
        std::fs::write(&f, idx(&[3, 0, 0], &[])).unwrap();
        assert!(load(&d).unwrap_err().to_string().contains("announces no data"));
        std::fs::write(&f, &good).unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte.gz"), [0x1f, 0x8b, 0, 0]).unwrap();
        std::fs::remove_file(d.join("train-labels-idx1-ubyte")).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("corrupt gzip"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
        let empty = tmp("empty");
        assert!(matches!(load(&empty), Err(DataError::NotFound { .. })));
        std::fs::remove_dir_all(empty).unwrap();
    }

    /// CIFAR-10 is not available offline: this writes files in its real binary
    /// layout (per record: one label byte, then 1024 red, 1024 green and 1024
    /// blue bytes of a 32x32 image) and loads them.
    #[test]
    fn cifar10_binary_layout() {
        let d = tmp("cifar");
        let record = |label: u8, fill: u8| {
            let mut r = vec![label];
            r.extend(std::iter::repeat_n(fill, CIFAR_IMAGE));
            r
        };
        for (i, name) in CIFAR_TRAIN.iter().enumerate() {
            let mut bytes = record(i as u8, i as u8 * 10);
            bytes.extend(record(9, 255));
            std::fs::write(d.join(name), bytes).unwrap();
        }
        std::fs::write(d.join(CIFAR_TEST), record(3, 7)).unwrap();
        let ds = load(&d).unwrap();
        assert_eq!(ds.format, Format::Cifar10);
        assert_eq!(ds.shape, [3, 32, 32]);
        assert_eq!(ds.train.len(), 10);
        assert_eq!(ds.train.labels[..4], [0, 9, 1, 9]);
        assert_eq!(ds.train.images[CIFAR_IMAGE * 2], 10);
        assert_eq!(ds.test.labels, vec![3]);
        // A record cut short.
        std::fs::write(d.join(CIFAR_TEST), &record(3, 7)[..100]).unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("not a whole number"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
