//! Fixture models written by the tests themselves.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// One tensor of a fixture file.
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn f32t(name: &str, shape: &[usize], values: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), values.len());
    T {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub fn f16t(name: &str, shape: &[usize], values: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

pub fn bf16t(name: &str, shape: &[usize], values: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

pub fn f64t(name: &str, shape: &[usize], values: &[f64]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F64,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub fn i64t(name: &str, shape: &[usize], values: &[i64]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::I64,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes a valid safetensors file with the official serializer.
pub fn write_model(path: &Path, tensors: &[T], meta: &[(&str, &str)]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// Bytes of a file with a hand-written header (for hostile inputs).
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
