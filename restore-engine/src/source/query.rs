//! Asking the destination how a migration ended, when the source lost the migration's
//! connection after sending the images: the destination keeps answering outcome queries (an
//! authenticated session of purpose `Query`) until the source acknowledges the outcome.

use std::thread;
use std::time::{Duration, Instant};

use super::{connect, Answer, MigrateParams, SourceError};
use crate::record::Phase;
use crate::wire::{Auth, Control, ControlCode, Intent, Kind, Outcome};

/// How often an unanswered question is asked again.
const RETRY: Duration = Duration::from_secs(1);

/// Asks the destination where migration `migration_id` stands there. With `acknowledge`, a
/// final answer is acknowledged (the destination may then stop answering).
pub fn query_outcome(
    destination: &str,
    auth: &Auth,
    migration_id: &str,
    acknowledge: bool,
) -> Result<Outcome, SourceError> {
    let mut session = connect(destination, auth, &Intent::query(migration_id))?;
    let _ = session
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)));
    let outcome: Outcome = session.expect(Kind::Outcome)?;
    let final_phase = Phase::parse(&outcome.phase).is_some_and(|p| p.is_final());
    if acknowledge && outcome.known && final_phase {
        let _ = session.send(
            Kind::Control,
            &Control {
                code: ControlCode::Ack as i32,
                message: String::new(),
            },
        );
    }
    Ok(outcome)
}

/// Asks until the destination gives a final answer. Gives up (`Err` with what was learnt) when
/// no answer came for `params.resolve_timeout`, when the destination does not know the
/// migration, or at `deadline` (a destination that keeps answering "still restoring").
pub(super) fn settle(params: &MigrateParams, deadline: Instant) -> Result<Answer, String> {
    let mut last_answer = Instant::now();
    let mut last: String;
    loop {
        match query_outcome(
            &params.destination,
            &params.auth,
            &params.migration_id,
            true,
        ) {
            Ok(outcome) if !outcome.known => {
                return Err(format!(
                    "the destination {} has no record of migration {}",
                    params.destination, params.migration_id
                ))
            }
            Ok(outcome) => {
                last_answer = Instant::now();
                match Phase::parse(&outcome.phase) {
                    Some(Phase::Committed) => return Ok(Answer::Committed),
                    Some(Phase::Aborted) => return Ok(Answer::Aborted(outcome.reason)),
                    Some(Phase::Lost) => return Ok(Answer::Lost(outcome.reason)),
                    Some(phase) => {
                        last = format!("the destination says the migration is {phase}");
                        log::info!("{}: {last}; asking again", params.container);
                    }
                    None => {
                        return Err(format!(
                            "the destination answered an unknown phase {:?}",
                            outcome.phase
                        ))
                    }
                }
            }
            Err(e) => {
                last = e.to_string();
                log::info!(
                    "{}: cannot ask the destination yet ({last})",
                    params.container
                );
            }
        }
        if last_answer.elapsed() >= params.resolve_timeout || Instant::now() >= deadline {
            return Err(format!(
                "the destination could not say how it ended within {:?} (last: {last})",
                params.resolve_timeout
            ));
        }
        thread::sleep(RETRY);
    }
}
