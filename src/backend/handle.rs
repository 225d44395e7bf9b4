//! Memory a backend owns, opaque to everything above it.
//!
//! Model code holds activations, weights and KV layers without knowing where their bytes are; each
//! backend stores its own type in a [`Handle`] (the CPU a `Vec`, CUDA device memory) and takes it
//! back out with a typed [`Handle::get`]. The check is one type-id comparison, what a `match` on a
//! per-backend enum cost before, and it keeps the shared types free of every backend's names.

use std::any::Any;

use super::BackendError;

/// A value of one backend's memory type.
pub struct Handle(Box<dyn Any + Send + Sync>);

impl Handle {
    pub fn new<T: Any + Send + Sync>(value: T) -> Handle {
        Handle(Box::new(value))
    }

    /// The value as `T`, or an error for `op` when another backend made it.
    #[inline]
    pub fn get<T: Any>(&self, op: &'static str) -> Result<&T, BackendError> {
        self.0.downcast_ref().ok_or_else(|| foreign(op))
    }

    /// As [`Handle::get`], mutably.
    #[inline]
    pub fn get_mut<T: Any>(&mut self, op: &'static str) -> Result<&mut T, BackendError> {
        self.0.downcast_mut().ok_or_else(|| foreign(op))
    }
}

/// The error for memory handed to a backend that did not make it.
pub fn foreign(op: &'static str) -> BackendError {
    BackendError::InvalidArgument { op, reason: "buffer belongs to another device".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_gives_back_only_its_own_type() {
        let mut h = Handle::new(vec![1.0f32, 2.0]);
        assert_eq!(h.get::<Vec<f32>>("t").unwrap(), &[1.0, 2.0]);
        h.get_mut::<Vec<f32>>("t").unwrap().push(3.0);
        assert_eq!(h.get::<Vec<f32>>("t").unwrap().len(), 3);
        let err = h.get::<Vec<u16>>("matmul").err().expect("wrong type").to_string();
        assert_eq!(err, "matmul: buffer belongs to another device");
    }
}
