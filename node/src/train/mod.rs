//! Training with burn: datasets in their real formats, deterministic
//! sharding, models, the flat-gradient training step the ring needs, flat
//! optimizers, parameter hashing, and checkpoints; a run's shared
//! configuration, and the compute worker a training peer runs its steps on.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod optim;
pub mod params;
pub mod run;
pub mod shard;
pub mod trainer;
pub mod worker;
