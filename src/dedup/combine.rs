//! Concurrent store calls of one kind, combined into one round trip.
//!
//! In single mode every worker claims (and later marks done) one key at a time: 64 workers
//! send 64 one-command pipelines, and Redis pays its per-round-trip cost (a read, a write,
//! an event-loop turn) for each. A [`Combiner`] lets one call at a time go to the store;
//! calls that arrive meanwhile queue, and when the call in flight returns, the first queued
//! caller takes every queued key (up to `max_keys`) to the store in one call and hands each
//! caller its replies. Nothing waits for a timer: an idle combiner sends a call at once, and
//! a busy one sends the next as soon as the current one is answered.
//!
//! Cancellation never strands a caller: whoever leads a call passes the lead on when it ends
//! or is dropped, and a caller whose leader was dropped before answering asks again.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use redis::Value;
use tokio::sync::oneshot;

use super::DedupError;

type Reply = Result<Vec<Value>, DedupError>;

/// A queued caller: its keys and where its replies go.
struct Waiter {
    keys: Vec<String>,
    tx: oneshot::Sender<Message>,
}

enum Message {
    /// The replies to the caller's keys, in order.
    Replies(Reply),
    /// The caller leads the next call, for its own keys and these callers'.
    Lead(Vec<Waiter>),
}

#[derive(Default)]
struct State {
    /// A call is in flight (or about to be sent by a caller that was handed the lead).
    busy: bool,
    queue: Vec<Waiter>,
}

pub struct Combiner {
    state: Mutex<State>,
    max_keys: usize,
}

impl Combiner {
    /// Combines calls up to `max_keys` keys (a larger single call goes alone).
    pub fn new(max_keys: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_keys: max_keys.max(1),
        }
    }

    /// Runs `send` for `keys`, possibly together with other callers' keys; `send` must give
    /// one reply per key, in order (anything else is an unexpected reply for every caller).
    pub async fn call<F, Fut>(&self, keys: &[&str], send: F) -> Reply
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Reply>,
    {
        loop {
            let queued = {
                let mut state = self.lock();
                if state.busy {
                    let (tx, rx) = oneshot::channel();
                    let keys = keys.iter().map(|k| k.to_string()).collect();
                    state.queue.push(Waiter { keys, tx });
                    Some(rx)
                } else {
                    state.busy = true;
                    None
                }
            };
            let others = match queued {
                None => Vec::new(),
                Some(rx) => {
                    let mut waiting = Waiting {
                        combiner: self,
                        rx,
                        answered: false,
                    };
                    let message = (&mut waiting.rx).await;
                    waiting.answered = true;
                    match message {
                        Ok(Message::Replies(reply)) => return reply,
                        Ok(Message::Lead(others)) => others,
                        // The caller leading our call was dropped before it answered.
                        Err(_) => continue,
                    }
                }
            };
            return self.lead(keys, others, &send).await;
        }
    }

    /// Sends one call for `keys` and the `others`' keys, answers the others, passes the lead.
    async fn lead<F, Fut>(&self, keys: &[&str], mut others: Vec<Waiter>, send: &F) -> Reply
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Reply>,
    {
        // Passes the lead on when dropped: after the answers, or if this future is dropped.
        let _lead = Lead(self);
        let counts: Vec<usize> = others.iter().map(|w| w.keys.len()).collect();
        let mut all: Vec<String> = Vec::with_capacity(keys.len() + counts.iter().sum::<usize>());
        all.extend(keys.iter().map(|k| k.to_string()));
        for w in &mut others {
            all.append(&mut w.keys);
        }
        let total = all.len();
        let mut replies = match send(all).await {
            Ok(replies) if replies.len() == total => replies,
            reply => {
                let e = match reply {
                    Ok(replies) => DedupError::UnexpectedReply(format!("{} replies for {total} keys", replies.len())),
                    Err(e) => e,
                };
                for w in others {
                    let _ = w.tx.send(Message::Replies(Err(e.clone())));
                }
                return Err(e);
            }
        };
        // Split from the back: the others' replies follow ours, in queue order.
        for (w, n) in others.into_iter().zip(counts).rev() {
            let theirs = replies.split_off(replies.len() - n);
            let _ = w.tx.send(Message::Replies(Ok(theirs)));
        }
        Ok(replies)
    }

    /// Hands the lead to the first queued caller still waiting, with the callers after it
    /// up to `max_keys`; with no one queued the combiner is idle again.
    fn pass_lead(&self) {
        let mut state = self.lock();
        loop {
            if state.queue.is_empty() {
                state.busy = false;
                return;
            }
            let leader = state.queue.remove(0);
            let mut keys = leader.keys.len();
            let mut take = 0;
            for w in &state.queue {
                if keys + w.keys.len() > self.max_keys {
                    break;
                }
                keys += w.keys.len();
                take += 1;
            }
            let others: Vec<Waiter> = state.queue.drain(..take).collect();
            match leader.tx.send(Message::Lead(others)) {
                Ok(()) => return,
                // That caller is gone: the others go back to the front of the queue.
                Err(Message::Lead(others)) => {
                    state.queue.splice(0..0, others);
                }
                Err(Message::Replies(_)) => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A queued caller's wait. Dropped unanswered (the caller was cancelled), it makes sure a
/// lead handed to it is not lost: the callers that came with it go back to the queue and
/// the lead moves on.
struct Waiting<'a> {
    combiner: &'a Combiner,
    rx: oneshot::Receiver<Message>,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // After close() no lead can be sent here any more; one sent before is taken back.
        self.rx.close();
        if let Ok(Message::Lead(others)) = self.rx.try_recv() {
            self.combiner.lock().queue.splice(0..0, others);
            self.combiner.pass_lead();
        }
    }
}

struct Lead<'a>(&'a Combiner);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.pass_lead();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// A store that answers each key with the key itself, once a permit is free, and
    /// remembers the keys of every call.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<Vec<String>>>,
        gate: Option<Arc<Semaphore>>,
        fail: bool,
        short: bool,
    }

    impl Fake {
        async fn send(&self, keys: Vec<String>) -> Reply {
            self.calls.lock().unwrap().push(keys.clone());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            if self.fail {
                return Err(DedupError::Timeout(Duration::from_millis(5)));
            }
            let n = if self.short { keys.len() - 1 } else { keys.len() };
            Ok(keys
                .into_iter()
                .take(n)
                .map(|k| Value::BulkString(k.into_bytes()))
                .collect())
        }

        fn calls(&self) -> Vec<Vec<String>> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn strings(reply: &[Value]) -> Vec<String> {
        reply
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    async fn call(c: &Combiner, fake: &Fake, keys: &[&str]) -> Reply {
        c.call(keys, |all| fake.send(all)).await
    }

    /// A combiner of `max_keys` over a fake store whose calls wait for the returned gate's permits.
    fn gated(max_keys: usize) -> (Arc<Semaphore>, Arc<Combiner>, Arc<Fake>) {
        let gate = Arc::new(Semaphore::new(0));
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
        };
        (gate, Arc::new(Combiner::new(max_keys)), Arc::new(fake))
    }

    /// Yields until the spawned tasks have run as far as they can.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn calls_one_after_another_go_alone_with_their_own_replies() {
        let (c, fake) = (Combiner::new(100), Fake::default());
        for keys in [&["a", "b"][..], &["c"], &["a"]] {
            let reply = call(&c, &fake, keys).await.unwrap();
            assert_eq!(strings(&reply), keys);
        }
        assert_eq!(fake.calls(), vec![vec!["a", "b"], vec!["c"], vec!["a"]]);
        assert!(!c.lock().busy && c.lock().queue.is_empty());
    }

    #[tokio::test]
    async fn calls_that_arrive_while_one_is_in_flight_share_the_next_call_and_get_their_own_replies() {
        let (gate, c, fake) = gated(100);
        let mut tasks = Vec::new();
        for keys in [vec!["first"], vec!["x1", "x2"], vec!["y"], vec!["z1", "z2", "z3"]] {
            let (c, fake) = (c.clone(), fake.clone());
            tasks.push(tokio::spawn(async move {
                let reply = call(&c, &fake, &keys).await.unwrap();
                (keys, strings(&reply))
            }));
            settle().await;
        }
        assert_eq!(fake.calls().len(), 1, "one call in flight, the others queued");
        gate.add_permits(2);
        for task in tasks {
            let (keys, reply) = task.await.unwrap();
            assert_eq!(reply, keys, "each caller gets the replies to its own keys");
        }
        assert_eq!(
            fake.calls(),
            vec![vec!["first"], vec!["x1", "x2", "y", "z1", "z2", "z3"]],
            "the three queued calls went as one"
        );
        assert!(!c.lock().busy);
    }

    #[tokio::test]
    async fn a_combined_call_holds_at_most_max_keys_and_the_rest_goes_next() {
        let (gate, c, fake) = gated(3);
        let mut tasks = Vec::new();
        for keys in [
            vec!["0"],
            vec!["a", "b"],
            vec!["c"],
            vec!["d"],
            vec!["e", "f", "g", "h"],
        ] {
            let (c, fake) = (c.clone(), fake.clone());
            tasks.push(tokio::spawn(async move {
                strings(&call(&c, &fake, &keys).await.unwrap()) == keys
            }));
            settle().await;
        }
        gate.add_permits(10);
        for task in tasks {
            assert!(task.await.unwrap());
        }
        assert_eq!(
            fake.calls(),
            vec![vec!["0"], vec!["a", "b", "c"], vec!["d"], vec!["e", "f", "g", "h"]],
            "up to 3 keys per combined call; a larger call goes alone"
        );
    }

    #[tokio::test]
    async fn an_error_or_a_wrong_number_of_replies_reaches_every_combined_caller() {
        for (fail, short) in [(true, false), (false, true)] {
            let gate = Arc::new(Semaphore::new(0));
            let c = Arc::new(Combiner::new(100));
            let fake = Arc::new(Fake {
                gate: Some(gate.clone()),
                fail,
                short,
                ..Fake::default()
            });
            let mut tasks = Vec::new();
            for keys in [vec!["a"], vec!["b"], vec!["c", "d"]] {
                let (c, fake) = (c.clone(), fake.clone());
                tasks.push(tokio::spawn(async move { call(&c, &fake, &keys).await }));
                settle().await;
            }
            gate.add_permits(2);
            for task in tasks {
                let e = task.await.unwrap().expect_err("the call failed");
                if fail {
                    assert!(matches!(e, DedupError::Timeout(_)), "{e}");
                } else {
                    assert!(matches!(e, DedupError::UnexpectedReply(_)), "{e}");
                }
            }
            assert!(!c.lock().busy);
        }
    }

    #[tokio::test]
    async fn a_leader_dropped_mid_call_strands_no_one() {
        let (gate, c, fake) = gated(100);
        let spawn = |keys: Vec<&'static str>| {
            let (c, fake) = (c.clone(), fake.clone());
            tokio::spawn(async move { strings(&call(&c, &fake, &keys).await.unwrap()) == keys })
        };
        let first = spawn(vec!["first"]);
        settle().await;
        let second = spawn(vec!["second"]);
        settle().await;
        let third = spawn(vec!["third"]);
        settle().await;
        // The first call is in flight; the second leads the next one (with the third) ...
        gate.add_permits(1);
        settle().await;
        assert!(first.await.unwrap());
        assert_eq!(fake.calls().len(), 2);
        // ... and is cancelled while it waits for the store.
        second.abort();
        settle().await;
        gate.add_permits(5);
        assert!(tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("not stranded")
            .unwrap());
        assert_eq!(
            fake.calls().last().unwrap(),
            &vec!["third".to_string()],
            "asked again, alone"
        );
        assert!(!c.lock().busy);
    }

    #[tokio::test]
    async fn a_caller_cancelled_while_it_waits_for_the_lead_strands_no_one() {
        let (gate, c, fake) = gated(100);
        let spawn = |keys: Vec<&'static str>| {
            let (c, fake) = (c.clone(), fake.clone());
            tokio::spawn(async move { strings(&call(&c, &fake, &keys).await.unwrap()) == keys })
        };
        let first = spawn(vec!["first"]);
        settle().await;
        let gone = spawn(vec!["gone"]);
        settle().await;
        let later = spawn(vec!["later"]);
        settle().await;
        // The first call is answered and the lead goes to "gone", which is cancelled at the
        // same moment: before or after the lead reaches it, "later" must still be served.
        gate.add_permits(1);
        gone.abort();
        settle().await;
        gate.add_permits(5);
        assert!(first.await.unwrap());
        assert!(tokio::time::timeout(Duration::from_secs(10), later)
            .await
            .expect("not stranded")
            .unwrap());
        assert!(!c.lock().busy);
        assert!(c.lock().queue.is_empty());
    }
}
