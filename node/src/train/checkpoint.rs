//! Checkpoints in safetensors, loadable by any safetensors reader: every
//! parameter under its module path (`model.fc1.weight`, ...), the optimizer's
//! moments as flat tensors (`optimizer.m`, `optimizer.v`), and in the header's
//! metadata the step, the round, the optimizer config and the parameter hash.
//! Written to a temporary file and renamed into place, so a crash never leaves
//! a half-written checkpoint; loading recomputes the parameter hash and refuses
//! a file whose parameters do not match it.

use super::optim::{Optimizer, OptimizerConfig};
use super::params::{Layout, param_hash};
use p2p_proto::Hash;
use p2p_proto::hash::hex;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read checkpoint {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "checkpoint {path} is corrupt: its {part} hash to {actual}, but it records {recorded}; \
         fetch it again or resume from another"
    )]
    HashMismatch { path: PathBuf, part: &'static str, recorded: String, actual: String },
}

/// What a checkpoint holds besides the model.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub round: u64,
    /// Samples of the run's sample stream consumed through `round` (checkpoints of a
    /// distributed run; absent in `node train` checkpoints).
    pub cursor: Option<u64>,
    pub params: Vec<f32>,
    pub optimizer: Optimizer,
    pub param_hash: Hash,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// blake3 of the optimizer state: config, step and moments.
pub fn optimizer_hash(o: &Optimizer) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/optimizer-state/v1");
    h.update(serde_json::to_string(&o.config).expect("config serializes").as_bytes());
    h.update(&o.step.to_le_bytes());
    h.update(&f32_bytes(&o.m));
    h.update(&f32_bytes(&o.v));
    *h.finalize().as_bytes()
}

/// Writes `params` (laid out by `layout`) and `optimizer` at `round` (and, for a distributed
/// run, the sample-stream `cursor` after it) to `path`, atomically.
pub fn save(
    path: &Path,
    layout: &Layout,
    params: &[f32],
    optimizer: &Optimizer,
    round: u64,
    cursor: Option<u64>,
) -> Result<Hash, CheckpointError> {
    let werr = |source| CheckpointError::Write { path: path.to_owned(), source };
    let hash = param_hash(params, layout);
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = layout
        .entries
        .iter()
        .map(|e| (format!("model.{}", e.name), e.shape.clone(), f32_bytes(&params[e.offset..e.offset + e.len])))
        .collect();
    buffers.push(("optimizer.m".into(), vec![optimizer.m.len()], f32_bytes(&optimizer.m)));
    if !optimizer.v.is_empty() {
        buffers.push(("optimizer.v".into(), vec![optimizer.v.len()], f32_bytes(&optimizer.v)));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("shape matches the bytes")))
        .collect();
    let mut meta: HashMap<String, String> = HashMap::from([
        ("format".into(), "dtrain-checkpoint/v1".into()),
        ("round".into(), round.to_string()),
        ("step".into(), optimizer.step.to_string()),
        ("param_hash".into(), hex(&hash)),
        ("optimizer_hash".into(), hex(&optimizer_hash(optimizer))),
        ("optimizer".into(), serde_json::to_string(&optimizer.config).expect("config serializes")),
        ("param_order".into(), layout.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(",")),
    ]);
    if let Some(c) = cursor {
        meta.insert("cursor".into(), c.to_string());
    }
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| werr(std::io::Error::other(e)))?;
    let tmp = path.with_extension("safetensors.tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)?;
    Ok(hash)
}

/// Reads a checkpoint for a model with `layout`, verifying its parameter hash.
pub fn load(path: &Path, layout: &Layout) -> Result<Checkpoint, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid { path: path.to_owned(), reason };
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read { path: path.to_owned(), source })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let meta = meta.metadata().clone().ok_or_else(|| invalid("no metadata header".into()))?;
    let field = |k: &str| meta.get(k).cloned().ok_or_else(|| invalid(format!("metadata has no '{k}'")));
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let read = |name: &str, len: usize| -> Result<Vec<f32>, CheckpointError> {
        let t = st
            .tensor(name)
            .map_err(|_| invalid(format!("tensor '{name}' is missing: is this checkpoint for another model?")))?;
        if t.dtype() != Dtype::F32 || t.data().len() != len * 4 {
            return Err(invalid(format!(
                "tensor '{name}' has {:?} x {} bytes, expected f32 x {len}",
                t.dtype(),
                t.data().len()
            )));
        }
        Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let mut params = vec![0.0f32; layout.total];
    for e in &layout.entries {
        params[e.offset..e.offset + e.len].copy_from_slice(&read(&format!("model.{}", e.name), e.len)?);
    }
    let config: OptimizerConfig = serde_json::from_str(&field("optimizer")?).map_err(|e| invalid(e.to_string()))?;
    let step: u64 = field("step")?.parse().map_err(|_| invalid("step is not a number".into()))?;
    let round: u64 = field("round")?.parse().map_err(|_| invalid("round is not a number".into()))?;
    let cursor = match meta.get("cursor") {
        Some(c) => Some(c.parse::<u64>().map_err(|_| invalid("cursor is not a number".into()))?),
        None => None,
    };
    let mut optimizer = Optimizer::new(config, layout.total);
    optimizer.step = step;
    optimizer.m = read("optimizer.m", layout.total)?;
    if !optimizer.v.is_empty() {
        optimizer.v = read("optimizer.v", layout.total)?;
    }
    let recorded = field("param_hash")?;
    let hash = param_hash(&params, layout);
    if hex(&hash) != recorded {
        return Err(CheckpointError::HashMismatch {
            path: path.to_owned(),
            part: "parameters",
            recorded,
            actual: hex(&hash),
        });
    }
    let recorded = field("optimizer_hash")?;
    let actual = hex(&optimizer_hash(&optimizer));
    if actual != recorded {
        return Err(CheckpointError::HashMismatch { path: path.to_owned(), part: "optimizer state", recorded, actual });
    }
    Ok(Checkpoint { round, cursor, params, optimizer, param_hash: hash })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::MlpConfig;
    use crate::train::params::deterministic_init;
    use burn::prelude::Device;

    #[test]
    fn save_load_round_trip_and_corruption_is_refused() {
        let model = MlpConfig::new(6, 2).with_hidden1(4).with_hidden2(3).init(&Device::flex());
        let layout = Layout::of(&model);
        let params = deterministic_init(&layout, 1);
        let mut opt = Optimizer::new(OptimizerConfig::adam(), layout.total);
        opt.apply(&mut params.clone(), &vec![0.5; layout.total], 1e-3);
        let dir = std::env::temp_dir().join(format!("dtrain-ckpt-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        let hash = save(&path, &layout, &params, &opt, 12, Some(768)).unwrap();
        assert!(!path.with_extension("safetensors.tmp").exists(), "the temporary file was renamed");
        let c = load(&path, &layout).unwrap();
        assert_eq!((c.round, c.cursor, c.param_hash), (12, Some(768), hash));
        assert_eq!(c.params, params);
        assert_eq!(c.optimizer, opt);
        // Any safetensors reader sees the weights under their module paths.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("model.fc1.weight").unwrap().shape(), &[6, 4]);
        // Flip one byte of the first and of the last tensor: the recorded hashes no longer match.
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for at in [data_start, bytes.len() - 3] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(matches!(load(&path, &layout), Err(CheckpointError::HashMismatch { .. })), "byte {at}");
        }
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(load(&path, &layout), Err(CheckpointError::Invalid { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
