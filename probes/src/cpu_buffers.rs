//! The CPU backend's buffers behind Burn tensors, for the few hot loops that run on them
//! directly (the ProbeX encoder, Adam). Generic code asks for a [`Host`] of its backend and
//! takes its ordinary tensor path when there is none (any other backend).

use std::any::{Any, TypeId};
use std::marker::PhantomData;

use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

/// Proof that backend `B` is the CPU backend: its f32 tensors convert to and from host
/// buffers without failing.
#[derive(Debug)]
pub(crate) struct Host<B>(PhantomData<B>);

// By hand: derived impls would ask `B: Copy`.
impl<B> Clone for Host<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for Host<B> {}

impl<B: Backend> Host<B> {
    /// `Some` exactly when `B`'s float tensors are the CPU backend's.
    pub(crate) fn of() -> Option<Self> {
        (TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>())
            .then_some(Host(PhantomData))
    }

    /// The contiguous f32 buffer behind `t`: the tensor's own when it is one (so a buffer
    /// nothing else holds can be written in place, see [`values_mut`]), else a copy.
    pub(crate) fn buffer<const D: usize>(&self, t: Tensor<B, D>) -> FlexTensor {
        let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
        let f = match boxed.downcast::<FlexTensor>() {
            Ok(f) => *f,
            Err(_) => unreachable!("Host::of checked that B's float primitive is FlexTensor"),
        };
        if f.dtype() != DType::F32 {
            FlexTensor::from_data(f.into_data().convert::<f32>())
        } else if f.as_slice::<f32>().is_none() {
            // A view (a transpose, a slice).
            f.to_contiguous()
        } else {
            f
        }
    }

    /// A tensor of `B` made of `buffer`.
    pub(crate) fn tensor<const D: usize>(&self, buffer: FlexTensor) -> Tensor<B, D> {
        let boxed: Box<dyn Any> = Box::new(buffer);
        match boxed.downcast::<B::FloatTensorPrimitive>() {
            Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(*p)),
            Err(_) => unreachable!("Host::of checked that B's float primitive is FlexTensor"),
        }
    }

    /// A tensor of `B` holding `values`.
    pub(crate) fn tensor_of<const D: usize>(
        &self,
        values: Vec<f32>,
        shape: [usize; D],
    ) -> Tensor<B, D> {
        self.tensor(FlexTensor::from_data(TensorData::new(values, shape)))
    }
}

/// The values of a buffer from [`Host::buffer`].
pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().unwrap_or(&[])
}

/// The values of a buffer from [`Host::buffer`] for writing, when nothing else holds them.
pub(crate) fn values_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let len = t.as_slice::<f32>()?.len();
    // The whole allocation: it is the buffer exactly when the lengths agree.
    t.try_storage_mut::<f32>().filter(|all| all.len() == len)
}
