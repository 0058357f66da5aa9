//! The floor of `scripts/bench.sh --peers`' latency rows: a plain librdkafka consumer with the
//! sidecar's fetch settings and nothing else (no group, no scheduler, no HTTP). It reads every
//! partition of a topic from the beginning and writes each record's value as one line to
//! standard output, flushed whenever librdkafka has nothing more at hand, for
//! `latency_app -stdin` to stamp its arrival:
//!
//!   latency_floor 127.0.0.1:9092 TOPIC PARTITIONS | latency_app -listen 127.0.0.1:18090 -stdin
//!
//! So a system's figure minus this one is what that system adds to what producer, broker and
//! librdkafka cost on the same box (kcat, the floor before, batches its output and measured
//! above both systems).
//!
//! Ends when standard output is closed (the app is gone), or when the bench kills it.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use kafka_sidecar::config::Config;
use kafka_sidecar::source::fetch_settings;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, partitions] = &args[..] else {
        eprintln!("usage: latency_floor BROKERS TOPIC PARTITIONS");
        return ExitCode::from(2);
    };
    let Ok(partitions) = partitions.parse::<i32>() else {
        eprintln!("latency_floor: PARTITIONS must be a number, not {partitions:?}");
        return ExitCode::from(2);
    };
    match run(brokers, topic, partitions) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe is how the bench stops it.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latency_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(brokers: &str, topic: &str, partitions: i32) -> std::io::Result<()> {
    let err = |e: rdkafka::error::KafkaError| std::io::Error::other(e.to_string());
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", "latency-floor")
        .set("enable.auto.commit", "false");
    // The sidecar's own fetch settings, at its defaults.
    for (key, value) in fetch_settings(&Config::default()) {
        cc.set(key, value);
    }
    let consumer: BaseConsumer = cc.create().map_err(err)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(err)?;
    }
    consumer.assign(&tpl).map_err(err)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut unflushed = false;
    loop {
        let wait = if unflushed {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(wait) {
            Some(Ok(msg)) => {
                if let Some(value) = msg.payload() {
                    out.write_all(value)?;
                    out.write_all(b"\n")?;
                    unflushed = true;
                }
            }
            Some(Err(e)) => eprintln!("latency_floor: {e}"),
            None if unflushed => {
                out.flush()?;
                unflushed = false;
            }
            None => {}
        }
    }
}
