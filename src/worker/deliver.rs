//! Deliver: one request to the app with the records admitted, timed, and its outcome fed to
//! the circuit breaker and the adaptive concurrency limit before the admission is released.

use tokio::time::Instant;

use super::admit::Pass;
use super::{outgoing, Open, Stopped, Worker};
use crate::breaker::counts_as_failure;
use crate::delivery::Reply;
use crate::metrics;

impl Worker {
    /// Sends `sending` as attempt `attempt`, holding `pass` until the app has answered.
    /// `Err` at shutdown's hard stop (the records stay unfinished).
    pub(super) async fn send(&self, sending: &[Open<'_>], attempt: u32, pass: Pass<'_>) -> Result<Reply, Stopped> {
        let records = outgoing(sending);
        self.metrics.batch_size.observe(sending.len() as f64);
        let started = Instant::now();
        let reply = tokio::select! {
            r = self.app.send(&records, attempt) => r,
            _ = self.hard_stop.cancelled() => return Err(Stopped),
        };
        drop(records);
        let exemplar = sending.first().and_then(|o| metrics::trace_exemplar(o.span.context()));
        self.metrics
            .observe_delivery(started.elapsed(), &reply.transport, exemplar);
        self.breaker.record(counts_as_failure(&reply.transport));
        self.limiter.on_result(&reply.transport);
        drop(pass);
        self.metrics.breaker_state.set(self.breaker.state().as_gauge());
        self.metrics.concurrency_limit.set(self.limiter.current_limit() as i64);
        Ok(reply)
    }
}
