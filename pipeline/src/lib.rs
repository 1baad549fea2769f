//! `cardinal-pipeline`: emulated NorthPole cards. The card spec and the
//! planner decide which parts of a model live on which card; the stages run
//! each card's parts with the int4 kernels under the card's memory budget;
//! the engine runs continuous batching through the cards and models the
//! time and energy real cards would spend. The engine sees token ids only.

pub mod api;
pub mod card;
pub mod energy;
pub mod engine;
pub mod eval;
pub mod plan;
pub mod prefix;
pub mod sampling;
pub mod stages;

pub use card::CardSpec;
pub use engine::{
    Engine, EngineConfig, Event, FinishReason, Finished, Request, Stream, SubmitError,
};
pub use plan::{Plan, PlanError};
pub use sampling::SamplingParams;
