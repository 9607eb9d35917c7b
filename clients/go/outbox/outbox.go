// Package outbox writes events into a service's outbox table, in the service's own
// transaction, for outbox-relay to publish to Kafka.
//
// A service writes its domain change and the event announcing it in one transaction:
//
//	tx, err := db.BeginTx(ctx, nil)
//	if err != nil {
//		return err
//	}
//	defer tx.Rollback() // a no-op after Commit
//	if _, err := tx.ExecContext(ctx, `UPDATE customers SET email = $1 WHERE id = $2`, email, id); err != nil {
//		return err
//	}
//	err = outbox.Write(ctx, tx, outbox.Event{
//		AggregateType: "customer",
//		AggregateID:   id,
//		EventType:     "CustomerEmailChanged",
//		Payload:       map[string]string{"email": email},
//	}, outbox.WithSchema("customer"), outbox.WithTraceContext(fromOtel))
//	if err != nil {
//		return fmt.Errorf("customer %s: %w", id, err)
//	}
//	return tx.Commit()
//
// The event is published only if the transaction commits, exactly as written: the
// relay's key is AggregateID, its value the payload, its headers the relay's own plus
// Headers (and the W3C trace context, when WithTraceContext provides it).
//
// The package imports nothing outside the standard library: anything with
// ExecContext works (a *sql.Tx, a *sql.Conn, pgx through its stdlib driver).
package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// Execer is what Write needs of a transaction: *sql.Tx, *sql.Conn and *sql.DB have it
// (outside a transaction the event is committed at once, on its own).
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// Event is one outbox row.
type Event struct {
	// AggregateType names the kind of entity, e.g. "customer". Required.
	AggregateType string
	// AggregateID is the entity's id: the Kafka key, so one aggregate's events keep
	// their order. Required.
	AggregateID string
	// EventType names what happened, e.g. "CustomerCreated". Required.
	EventType string
	// Payload is the record's value: any value encoding/json can marshal, or raw JSON
	// (json.RawMessage or []byte). nil is a tombstone (a null Kafka value).
	Payload any
	// Topic overrides the relay source's topic for this event. Optional.
	Topic string
	// Headers are added to the Kafka record. Optional; the relay's own header names
	// (see ReservedHeaders) are refused.
	Headers map[string]string
	// CorrelationID becomes the correlation_id header. Optional.
	CorrelationID string
	// IdempotencyToken is unique per outbox: a second event with the same token fails
	// with ErrDuplicateIdempotencyToken. Optional.
	IdempotencyToken string
}

// ReservedHeaders are the header names the relay sets itself.
var ReservedHeaders = []string{
	"event_id", "event_type", "aggregate_type", "source", "correlation_id",
	"idempotency_token", "content-type",
}

var (
	// ErrInvalidEvent is wrapped by every *ValidationError.
	ErrInvalidEvent = errors.New("outbox: invalid event")
	// ErrDuplicateIdempotencyToken: the outbox already holds an event with this
	// IdempotencyToken (the insert failed; roll the transaction back).
	ErrDuplicateIdempotencyToken = errors.New("outbox: duplicate idempotency token")
)

// ValidationError says which field of which event breaks the relay's contract.
// errors.Is(err, ErrInvalidEvent) holds for it.
type ValidationError struct {
	// Index of the event in a batch (0 for Write).
	Index int
	// Field is the Event field at fault.
	Field string
	// Reason says what is wrong with it.
	Reason string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("outbox: invalid event %d: %s %s", e.Index, e.Field, e.Reason)
}

// Is makes errors.Is(err, ErrInvalidEvent) true.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalidEvent }

// TraceContext returns the W3C traceparent and tracestate of ctx ("" when there is
// none). An OpenTelemetry service passes a function that reads them from its
// propagator, so this package does not depend on OpenTelemetry.
type TraceContext func(ctx context.Context) (traceparent, tracestate string)

type options struct {
	table string
	trace TraceContext
}

// Option changes how events are written.
type Option func(*options) error

var identifier = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// WithSchema writes into schema's outbox table (default: the connection's search_path).
// The schema is a plain lowercase identifier, as the relay's configuration requires.
func WithSchema(schema string) Option {
	return func(o *options) error {
		if !identifier.MatchString(schema) {
			return &ValidationError{Field: "schema", Reason: fmt.Sprintf("%q is not a plain lowercase identifier", schema)}
		}
		o.table = schema + ".outbox"
		return nil
	}
}

// WithTraceContext adds the traceparent and tracestate headers fn finds in the
// context, unless the event sets them itself.
func WithTraceContext(fn TraceContext) Option {
	return func(o *options) error {
		o.trace = fn
		return nil
	}
}

// Write inserts e into the outbox within tx. Nothing is written when e is invalid
// (a *ValidationError) or ctx is done (ctx.Err()).
func Write(ctx context.Context, tx Execer, e Event, opts ...Option) error {
	return WriteBatch(ctx, tx, []Event{e}, opts...)
}

var traceparent = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// WriteBatch inserts events, in order, with one statement: all of them or, when one
// is invalid or ctx is done, none.
func WriteBatch(ctx context.Context, tx Execer, events []Event, opts ...Option) error {
	o := options{table: "outbox"}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(events) == 0 {
		return nil
	}
	var parent, state string
	if o.trace != nil {
		parent, state = o.trace(ctx)
		if parent != "" && !traceparent.MatchString(parent) {
			parent, state = "", ""
		}
	}
	const columns = 8
	args := make([]any, 0, len(events)*columns)
	rows := make([]string, 0, len(events))
	for i, e := range events {
		row, err := e.args(i, parent, state)
		if err != nil {
			return err
		}
		n := len(args)
		rows = append(rows, fmt.Sprintf("($%d, $%d, $%d, $%d::jsonb, $%d, $%d::jsonb, $%d, $%d)",
			n+1, n+2, n+3, n+4, n+5, n+6, n+7, n+8))
		args = append(args, row...)
	}
	query := "INSERT INTO " + o.table + " (aggregate_type, aggregate_id, event_type, payload, " +
		"topic, headers, correlation_id, idempotency_token) VALUES " + strings.Join(rows, ", ")
	if _, err := tx.ExecContext(ctx, query, args...); err != nil {
		if isDuplicateToken(err) {
			return fmt.Errorf("%w: %v", ErrDuplicateIdempotencyToken, err)
		}
		return fmt.Errorf("outbox: insert into %s: %w", o.table, err)
	}
	return nil
}

// args validates e against the relay's contract and returns its column values.
func (e Event) args(i int, parent, state string) ([]any, error) {
	invalid := func(field, reason string) error {
		return &ValidationError{Index: i, Field: field, Reason: reason}
	}
	for field, v := range map[string]string{"AggregateType": e.AggregateType, "AggregateID": e.AggregateID, "EventType": e.EventType} {
		if strings.TrimSpace(v) == "" {
			return nil, invalid(field, "is required")
		}
	}
	if e.Topic != "" {
		if err := validateTopic(e.Topic); err != "" {
			return nil, invalid("Topic", err)
		}
	}
	headers := make(map[string]string, len(e.Headers)+2)
	for k, v := range e.Headers {
		if k == "" {
			return nil, invalid("Headers", "has an empty name")
		}
		for _, r := range ReservedHeaders {
			if strings.EqualFold(k, r) || strings.HasPrefix(strings.ToLower(k), "ce_") {
				return nil, invalid("Headers", fmt.Sprintf("%q is a header the relay sets itself", k))
			}
		}
		headers[k] = v
	}
	if parent != "" {
		if _, set := headers["traceparent"]; !set {
			headers["traceparent"] = parent
			if state != "" {
				headers["tracestate"] = state
			}
		}
	}
	payload, err := encodePayload(e.Payload)
	if err != nil {
		return nil, invalid("Payload", err.Error())
	}
	var headersJSON any
	if len(headers) > 0 {
		b, err := json.Marshal(headers)
		if err != nil {
			return nil, invalid("Headers", err.Error())
		}
		headersJSON = string(b)
	}
	return []any{e.AggregateType, e.AggregateID, e.EventType, payload, orNull(e.Topic),
		headersJSON, orNull(e.CorrelationID), orNull(e.IdempotencyToken)}, nil
}

// encodePayload turns a payload into JSON text, or nil for a tombstone.
func encodePayload(p any) (any, error) {
	switch v := p.(type) {
	case nil:
		return nil, nil
	case json.RawMessage:
		return rawJSON(v)
	case []byte:
		return rawJSON(v)
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("cannot be encoded as JSON: %v", err)
		}
		if string(b) == "null" {
			return nil, nil
		}
		return string(b), nil
	}
}

func rawJSON(b []byte) (any, error) {
	if b == nil {
		return nil, nil
	}
	if !json.Valid(b) {
		return nil, errors.New("is not valid JSON")
	}
	return string(b), nil
}

func orNull(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// validateTopic applies Kafka's (and the relay's) topic name rules.
func validateTopic(t string) string {
	if len(t) > 249 {
		return "must be at most 249 characters long"
	}
	if t == "." || t == ".." {
		return fmt.Sprintf("%q is not a valid topic name", t)
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Sprintf("%q holds %q; topic names use only ASCII letters, digits, '.', '_' and '-'", t, c)
		}
	}
	return ""
}

// isDuplicateToken recognises PostgreSQL's unique violation (SQLSTATE 23505) on the
// idempotency token, from any driver: lib/pq and pgx expose SQLState(), and every
// driver's message names the constraint.
func isDuplicateToken(err error) bool {
	var coded interface{ SQLState() string }
	if errors.As(err, &coded) && coded.SQLState() != "23505" {
		return false
	}
	return strings.Contains(err.Error(), "idempotency_token")
}
