//! Placeholder for the template module (being written).
