//! Why a stage kind refuses its params, and which param is to blame.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

/// Why a stage kind refuses its params ([`Stage::check`], [`Stage::plan_facts`]): the error,
/// and the key whose value is wrong when one is, so the engine shows it at that value in the
/// experiment file rather than at the stage's name.
///
/// A kind passes on any error with `?` (blamed on the stage as a whole) or names the key with
/// [`ParamError::at`]. The key is a path: `epochs`, `finetune.epochs` (a key of a table) or
/// `classes.3` (an item of an array); the engine points at the deepest part it finds.
///
/// It is not itself a [`std::error::Error`], so that every error converts into it with `?`.
///
/// [`Stage::check`]: crate::Stage::check
/// [`Stage::plan_facts`]: crate::Stage::plan_facts
#[derive(Debug)]
pub struct ParamError {
    key: Option<Cow<'static, str>>,
    error: Box<dyn Error + Send + Sync>,
}

impl ParamError {
    /// An objection to the value of `key` (a dotted path, see the type's docs).
    pub fn at(
        key: impl Into<Cow<'static, str>>,
        error: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        ParamError {
            key: Some(key.into()),
            error: error.into(),
        }
    }

    /// An objection to the stage as a whole (a combination of keys, or something its inputs
    /// will not provide).
    pub fn whole(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        ParamError {
            key: None,
            error: error.into(),
        }
    }

    /// The key blamed, if one is.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The error itself, for callers outside the engine that pass it on (as `anyhow`'s
    /// source, say).
    pub fn into_error(self) -> Box<dyn Error + Send + Sync> {
        self.error
    }
}

impl<E: Into<Box<dyn Error + Send + Sync>>> From<E> for ParamError {
    fn from(error: E) -> Self {
        ParamError::whole(error)
    }
}

/// So a kind's `run` passes one on with `?`, as the error it wraps.
impl From<ParamError> for anyhow::Error {
    fn from(e: ParamError) -> Self {
        anyhow::Error::from_boxed(e.error)
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("typed")]
    struct Typed;

    fn passes_on() -> Result<(), ParamError> {
        Err(Typed)?
    }

    #[test]
    fn keeps_the_key_and_the_message() {
        let e = ParamError::at("finetune.epochs", "must be at least 1");
        assert_eq!(e.key(), Some("finetune.epochs"));
        assert_eq!(e.to_string(), "must be at least 1");
        let e = passes_on().unwrap_err();
        assert_eq!((e.key(), e.to_string().as_str()), (None, "typed"));
        assert!(e.into_error().downcast::<Typed>().is_ok());
    }
}
