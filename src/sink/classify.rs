//! What a failed publish means, decided once: every librdkafka error code the relay
//! knows maps to a [`Reason`] (the metric label), each reason to a [`Blame`] (what
//! happens to the event), and the codes after which the producer must be replaced are
//! marked in the same table.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Who is to blame for a failed publish, which decides what happens to the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The transport (brokers unreachable, timeouts, leader changes, credentials):
    /// not the event's fault. The row is left as it is and the source backs off.
    Transport,
    /// Perhaps the event: its retry count goes up, and it is retried after a backoff,
    /// then dead-lettered once its retries are spent.
    Retry,
    /// The event itself, and it will never succeed: dead-lettered at once.
    Permanent,
}

/// Why a publish failed, with bounded cardinality: the `reason` label of
/// `outbox_events_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Brokers unreachable, slow, or refusing the relay's credentials.
    Transport,
    /// Larger than the producer's or the broker's limit.
    MessageTooLarge,
    /// A topic name the broker or the relay refuses.
    InvalidTopic,
    /// A row that cannot become a record, or a record the broker refuses.
    InvalidRecord,
    /// The topic does not exist and the broker does not create it.
    UnknownTopic,
    /// The relay may not write the topic a row names in its own `topic` column.
    TopicRefused,
    /// Anything else.
    Other,
}

impl Reason {
    /// Every reason, for pre-creating each metric series at zero.
    pub const ALL: [Reason; 7] = [
        Reason::Transport,
        Reason::MessageTooLarge,
        Reason::InvalidTopic,
        Reason::InvalidRecord,
        Reason::UnknownTopic,
        Reason::TopicRefused,
        Reason::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Transport => "transport",
            Reason::MessageTooLarge => "message_too_large",
            Reason::InvalidTopic => "invalid_topic",
            Reason::InvalidRecord => "invalid_record",
            Reason::UnknownTopic => "unknown_topic",
            Reason::TopicRefused => "topic_refused",
            Reason::Other => "other",
        }
    }

    /// What a failure for this reason does to its event.
    pub fn blame(self) -> Blame {
        match self {
            Reason::Transport => Blame::Transport,
            Reason::MessageTooLarge | Reason::InvalidTopic | Reason::InvalidRecord => {
                Blame::Permanent
            }
            Reason::UnknownTopic | Reason::TopicRefused | Reason::Other => Blame::Retry,
        }
    }
}

/// A failed publish: why, and what a person reads in `last_error` or the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why.
    pub reason: Reason,
    /// The error and a hint.
    pub message: String,
}

impl Failure {
    /// A failure of the relay's own making when turning a row into a record.
    pub fn invalid_record(message: String) -> Failure {
        Failure {
            reason: Reason::InvalidRecord,
            message,
        }
    }

    /// The transport failed this record (the message says how).
    pub fn transport(message: String) -> Failure {
        Failure {
            reason: Reason::Transport,
            message,
        }
    }

    /// What the failure does to its event.
    pub fn blame(&self) -> Blame {
        self.reason.blame()
    }
}

/// A classified librdkafka error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// What it means for the event.
    pub failure: Failure,
    /// Whether the brokers no longer accept this producer's id or sequence: only a new
    /// producer (a new producer id) gets through.
    pub breaks_producer: bool,
    /// Whether the error is about the record's topic (missing, or not writable by the
    /// relay): see [`Classified::for_topic`].
    topic_scoped: bool,
}

impl Classified {
    /// The failure once it is known whose topic the record went to. A topic that is
    /// missing or that the relay may not write is the row's fault when the row named
    /// it in its own `topic` column (retried, then dead-lettered: the source goes on),
    /// and an outage when it is the source's configured topic (the source pauses, and
    /// nothing is dead-lettered for a setting of the relay's).
    pub fn for_topic(mut self, rows_own_topic: bool) -> Classified {
        if !self.topic_scoped {
            return self;
        }
        self.failure = if rows_own_topic {
            Failure {
                reason: if self.failure.reason == Reason::Transport {
                    Reason::TopicRefused
                } else {
                    self.failure.reason
                },
                message: format!(
                    "{} (the topic named in the row's topic column; create it or let the \
                     relay write it, or fix the row's topic, then replay)",
                    self.failure.message
                ),
            }
        } else {
            Failure::transport(format!(
                "{} (the source's configured topic: the source waits until the topic \
                 exists and the relay may write it)",
                self.failure.message
            ))
        };
        self
    }
}

/// Classifies a librdkafka error, once, for every caller.
pub fn classify(err: &KafkaError) -> Classified {
    use RDKafkaErrorCode as C;
    let code = err.rdkafka_error_code();
    let (reason, hint, breaks_producer) = match code {
        Some(code) => by_code(code),
        None => (Reason::Other, "unexpected error", false),
    };
    Classified {
        failure: Failure {
            reason,
            message: format!("{err} ({hint})"),
        },
        breaks_producer,
        topic_scoped: matches!(
            code,
            Some(
                C::TopicAuthorizationFailed
                    | C::UnknownTopic
                    | C::UnknownTopicOrPartition
                    | C::UnknownPartition
            )
        ),
    }
}

/// The table: reason, hint for a person, and whether the producer must be replaced.
fn by_code(code: RDKafkaErrorCode) -> (Reason, &'static str, bool) {
    use RDKafkaErrorCode as C;
    const TRANSPORT: &str = "the brokers are unreachable, slow or refuse the relay's credentials";
    const PRODUCER_ID: &str =
        "the brokers no longer accept this producer's id or sequence; a new producer is created";
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => (
            Reason::MessageTooLarge,
            "the record is larger than the producer's message.max.bytes or the broker's max.message.bytes; shrink the payload or raise the limit, then replay",
            false,
        ),
        C::InvalidTopic => (
            Reason::InvalidTopic,
            "the broker refuses this topic name; fix the row's topic, then replay",
            false,
        ),
        C::InvalidRecord | C::InvalidMessage | C::InvalidTimestamp => (
            Reason::InvalidRecord,
            "the broker refuses this record",
            false,
        ),
        C::Fatal
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::UnknownProducerId
        | C::OutOfOrderSequenceNumber
        | C::InvalidProducerIdMapping => (Reason::Transport, PRODUCER_ID, true),
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::MessageTimedOut
        | C::OperationTimedOut
        | C::RequestTimedOut
        | C::Resolve
        | C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::QueueFull
        | C::PurgeQueue
        | C::PurgeInflight
        | C::ThrottlingQuotaExceeded
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::PreferredLeaderNotAvailable
        | C::TimedOutQueue
        | C::Fenced
        | C::SSL
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::UnsupportedCompressionType => (Reason::Transport, TRANSPORT, false),
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition => (
            Reason::UnknownTopic,
            "the topic does not exist and the broker does not create it; create the topic or fix the row's topic",
            false,
        ),
        _ => (Reason::Other, "unexpected error", false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(code: RDKafkaErrorCode) -> Classified {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn errors_are_classified_by_who_is_to_blame() {
        use RDKafkaErrorCode as C;
        for (code, blame) in [
            (C::MessageSizeTooLarge, Blame::Permanent),
            (C::InvalidTopic, Blame::Permanent),
            (C::AllBrokersDown, Blame::Transport),
            (C::MessageTimedOut, Blame::Transport),
            (C::NotLeaderForPartition, Blame::Transport),
            (C::TopicAuthorizationFailed, Blame::Transport),
            (C::UnknownTopicOrPartition, Blame::Retry),
            (C::PolicyViolation, Blame::Retry),
        ] {
            assert_eq!(c(code).failure.blame(), blame, "{code:?}");
        }
        assert_eq!(c(C::PolicyViolation).failure.reason, Reason::Other);
        assert!(c(C::MessageSizeTooLarge)
            .failure
            .message
            .contains("message.max.bytes"));
    }

    #[test]
    fn producer_id_errors_replace_the_producer_and_blame_the_transport() {
        use RDKafkaErrorCode as C;
        for code in [
            C::Fatal,
            C::ProducerFenced,
            C::InvalidProducerEpoch,
            C::UnknownProducerId,
            C::OutOfOrderSequenceNumber,
            C::InvalidProducerIdMapping,
        ] {
            let got = c(code);
            assert!(got.breaks_producer, "{code:?}");
            assert_eq!(got.failure.blame(), Blame::Transport, "{code:?}");
        }
        assert!(!c(C::AllBrokersDown).breaks_producer);
        assert!(!c(C::MessageSizeTooLarge).breaks_producer);
    }

    #[test]
    fn a_missing_or_forbidden_topic_is_the_rows_fault_only_when_the_row_named_it() {
        use RDKafkaErrorCode as C;
        let own = c(C::TopicAuthorizationFailed).for_topic(true).failure;
        assert_eq!(own.reason, Reason::TopicRefused);
        assert_eq!(own.blame(), Blame::Retry);
        assert!(
            own.message.contains("row's topic column"),
            "{}",
            own.message
        );
        let configured = c(C::TopicAuthorizationFailed).for_topic(false).failure;
        assert_eq!(configured.blame(), Blame::Transport);
        let own = c(C::UnknownTopicOrPartition).for_topic(true).failure;
        assert_eq!(
            (own.reason, own.blame()),
            (Reason::UnknownTopic, Blame::Retry)
        );
        let configured = c(C::UnknownTopicOrPartition).for_topic(false).failure;
        assert_eq!(configured.blame(), Blame::Transport);
        assert!(configured.message.contains("configured topic"));
        // Other errors do not depend on the topic.
        assert_eq!(
            c(C::MessageSizeTooLarge).for_topic(false).failure.blame(),
            Blame::Permanent
        );
        assert_eq!(
            c(C::AllBrokersDown).for_topic(true).failure.blame(),
            Blame::Transport
        );
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
    }
}
