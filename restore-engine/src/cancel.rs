//! A reason to stop, set from another thread (the shim said the restore failed, or went away)
//! and checked by the long waits of the receiving end.

use std::sync::{Arc, Mutex};

#[derive(Clone, Default, Debug)]
pub struct Cancel(Arc<Mutex<Option<String>>>);

impl Cancel {
    /// Asks every holder to stop; the first reason stays.
    pub fn cancel(&self, reason: &str) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| reason.to_string());
    }

    /// Why to stop, if asked to.
    pub fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
