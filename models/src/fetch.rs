//! Placeholder for the fetch module (being written).
