package outbox_test

// Against a real PostgreSQL whose outbox the relay migrated: TEST_DATABASE_URL
// names one, or the tests start their own server from the local binaries (initdb and
// pg_ctl, run as the postgres user when the tests run as root) and migrate it with the
// relay binary named by RELAY_BIN (scripts/test sets both up).

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	_ "github.com/lib/pq"

	"outbox-relay/clients/go/outbox"
)

const schema = "orders"

var db *sql.DB

func TestMain(m *testing.M) {
	url, stop, err := database()
	if err != nil {
		fmt.Fprintln(os.Stderr, "outbox tests:", err)
		os.Exit(1)
	}
	code := 1
	func() {
		defer stop()
		if err = migrate(url); err != nil {
			fmt.Fprintln(os.Stderr, "outbox tests: migrate:", err)
			return
		}
		if db, err = sql.Open("postgres", url); err != nil {
			fmt.Fprintln(os.Stderr, "outbox tests:", err)
			return
		}
		defer db.Close()
		code = m.Run()
	}()
	os.Exit(code)
}

// database returns the URL of a PostgreSQL to test against, and how to stop it.
func database() (string, func(), error) {
	if url := os.Getenv("TEST_DATABASE_URL"); url != "" {
		return url, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "outbox-go-test-")
	if err != nil {
		return "", nil, err
	}
	asPostgres := func(args ...string) *exec.Cmd { return exec.Command(args[0], args[1:]...) }
	if os.Geteuid() == 0 {
		// initdb refuses root: run the server as postgres.
		u, err := user.Lookup("postgres")
		if err != nil {
			return "", nil, fmt.Errorf("running as root needs a postgres user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			return "", nil, err
		}
		asPostgres = func(args ...string) *exec.Cmd {
			return exec.Command("runuser", append([]string{"-u", "postgres", "--"}, args...)...)
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := asPostgres("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync").CombinedOutput(); err != nil {
		return "", nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", port, dir)
	if out, err := asPostgres("pg_ctl", "-D", data, "-o", opts, "-l", filepath.Join(dir, "log"), "-w", "start").CombinedOutput(); err != nil {
		return "", nil, fmt.Errorf("pg_ctl start: %v: %s", err, out)
	}
	stop := func() {
		asPostgres("pg_ctl", "-D", data, "-m", "immediate", "stop").Run()
		os.RemoveAll(dir)
	}
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port), stop, nil
}

// migrate has the relay create the outbox of schema orders.
func migrate(url string) error {
	bin := os.Getenv("RELAY_BIN")
	if bin == "" {
		return errors.New("RELAY_BIN must name the outbox-relay binary (scripts/test sets it)")
	}
	dir, err := os.MkdirTemp("", "outbox-go-relay-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	config := filepath.Join(dir, "relay.toml")
	toml := fmt.Sprintf("database_url = %q\n[[sources]]\nname = \"orders\"\nschema = %q\ntopic = \"orders.events\"\n", url, schema)
	if err := os.WriteFile(config, []byte(toml), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "--config", config, "migrate")
	// The relay reads OUTBOX_* variables as its settings: none of the caller's.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(strings.ToUpper(kv), "OUTBOX_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// row is an outbox row as the relay reads it.
type row struct {
	AggregateType, AggregateID, EventType string
	Payload, Topic, Headers               sql.NullString
	CorrelationID, IdempotencyToken       sql.NullString
}

// rows returns the rows of aggregate id, in id order.
func rows(t *testing.T, id string) []row {
	t.Helper()
	r, err := db.Query(`SELECT aggregate_type, aggregate_id, event_type, payload::text, topic,
		headers::text, correlation_id, idempotency_token FROM orders.outbox
		WHERE aggregate_id = $1 ORDER BY id`, id)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var out []row
	for r.Next() {
		var x row
		if err := r.Scan(&x.AggregateType, &x.AggregateID, &x.EventType, &x.Payload, &x.Topic,
			&x.Headers, &x.CorrelationID, &x.IdempotencyToken); err != nil {
			t.Fatal(err)
		}
		out = append(out, x)
	}
	return out
}

// inTx runs fn in a transaction and commits it when fn returns nil, else rolls back.
func inTx(t *testing.T, fn func(tx *sql.Tx) error) error {
	t.Helper()
	tx, err := db.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := fn(tx); err != nil {
		if rb := tx.Rollback(); rb != nil {
			t.Fatal(rb)
		}
		return err
	}
	return tx.Commit()
}

func id(t *testing.T) string { return strings.ReplaceAll(t.Name(), "/", "-") }

func trace(context.Context) (string, string) {
	return "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61rcWkgMzE"
}

func TestWriteAndCommitGivesTheRowTheContractDescribes(t *testing.T) {
	agg := id(t)
	err := inTx(t, func(tx *sql.Tx) error {
		return outbox.Write(context.Background(), tx, outbox.Event{
			AggregateType: "order",
			AggregateID:   agg,
			EventType:     "OrderPlaced",
			Payload: struct {
				Total int `json:"total"`
			}{5},
			Topic:            "orders.special",
			Headers:          map[string]string{"tenant": "acme"},
			CorrelationID:    "corr-1",
			IdempotencyToken: agg + "-tok",
		}, outbox.WithSchema(schema), outbox.WithTraceContext(trace))
	})
	if err != nil {
		t.Fatal(err)
	}
	got := rows(t, agg)
	if len(got) != 1 {
		t.Fatalf("%d rows, want 1", len(got))
	}
	r := got[0]
	if r.AggregateType != "order" || r.EventType != "OrderPlaced" || r.Payload.String != `{"total": 5}` ||
		r.Topic.String != "orders.special" || r.CorrelationID.String != "corr-1" || r.IdempotencyToken.String != agg+"-tok" {
		t.Fatalf("row %+v", r)
	}
	var headers map[string]string
	if err := json.Unmarshal([]byte(r.Headers.String), &headers); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"tenant": "acme", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "congo=t61rcWkgMzE"}
	if fmt.Sprint(headers) != fmt.Sprint(want) {
		t.Fatalf("headers %v, want %v", headers, want)
	}
}

func TestAnErrorAfterTheWriteAndARollbackLeaveNoRow(t *testing.T) {
	agg := id(t)
	boom := errors.New("the service's own statement failed")
	err := inTx(t, func(tx *sql.Tx) error {
		if err := outbox.Write(context.Background(), tx, outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "OrderPlaced"}, outbox.WithSchema(schema)); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err %v", err)
	}
	if n := len(rows(t, agg)); n != 0 {
		t.Fatalf("%d rows after the rollback", n)
	}
}

func TestACancelledContextWritesNothing(t *testing.T) {
	agg := id(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := inTx(t, func(tx *sql.Tx) error {
		return outbox.Write(ctx, tx, outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "OrderPlaced"}, outbox.WithSchema(schema))
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if n := len(rows(t, agg)); n != 0 {
		t.Fatalf("%d rows", n)
	}
}

func TestInvalidEventsAreTypedErrorsAndWriteNothing(t *testing.T) {
	agg := id(t)
	ok := outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "OrderPlaced"}
	cases := []struct {
		field string
		edit  func(*outbox.Event)
	}{
		{"AggregateID", func(e *outbox.Event) { e.AggregateID = " " }},
		{"AggregateType", func(e *outbox.Event) { e.AggregateType = "" }},
		{"EventType", func(e *outbox.Event) { e.EventType = "" }},
		{"Topic", func(e *outbox.Event) { e.Topic = "no spaces" }},
		{"Topic", func(e *outbox.Event) { e.Topic = ".." }},
		{"Topic", func(e *outbox.Event) { e.Topic = strings.Repeat("t", 250) }},
		{"Headers", func(e *outbox.Event) { e.Headers = map[string]string{"event_id": "x"} }},
		{"Headers", func(e *outbox.Event) { e.Headers = map[string]string{"ce_id": "x"} }},
		{"Headers", func(e *outbox.Event) { e.Headers = map[string]string{"": "x"} }},
		{"Payload", func(e *outbox.Event) { e.Payload = json.RawMessage(`{"open":`) }},
		{"Payload", func(e *outbox.Event) { e.Payload = []byte(`nope`) }},
		{"Payload", func(e *outbox.Event) { e.Payload = func() {} }},
	}
	for _, c := range cases {
		bad := ok
		c.edit(&bad)
		// The invalid event second in a batch: the valid first one is not written either.
		err := inTx(t, func(tx *sql.Tx) error {
			return outbox.WriteBatch(context.Background(), tx, []outbox.Event{ok, bad}, outbox.WithSchema(schema))
		})
		var v *outbox.ValidationError
		if !errors.Is(err, outbox.ErrInvalidEvent) || !errors.As(err, &v) || v.Field != c.field || v.Index != 1 {
			t.Fatalf("%s: err %v", c.field, err)
		}
	}
	if err := outbox.Write(context.Background(), db, ok, outbox.WithSchema("Bad-Schema")); !errors.Is(err, outbox.ErrInvalidEvent) {
		t.Fatalf("schema: err %v", err)
	}
	if n := len(rows(t, agg)); n != 0 {
		t.Fatalf("%d rows", n)
	}
}

func TestADuplicateIdempotencyTokenIsItsOwnError(t *testing.T) {
	agg := id(t)
	e := outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "OrderPlaced", IdempotencyToken: agg}
	if err := inTx(t, func(tx *sql.Tx) error { return outbox.Write(context.Background(), tx, e, outbox.WithSchema(schema)) }); err != nil {
		t.Fatal(err)
	}
	err := inTx(t, func(tx *sql.Tx) error { return outbox.Write(context.Background(), tx, e, outbox.WithSchema(schema)) })
	if !errors.Is(err, outbox.ErrDuplicateIdempotencyToken) {
		t.Fatalf("err %v", err)
	}
	if n := len(rows(t, agg)); n != 1 {
		t.Fatalf("%d rows", n)
	}
}

func TestABatchKeepsItsOrderAndNilIsATombstone(t *testing.T) {
	agg := id(t)
	events := []outbox.Event{
		{AggregateType: "order", AggregateID: agg, EventType: "A", Payload: json.RawMessage(`{"n":1}`)},
		{AggregateType: "order", AggregateID: agg, EventType: "B", Payload: []byte(`[2]`)},
		{AggregateType: "order", AggregateID: agg, EventType: "C", Payload: nil},
		{AggregateType: "order", AggregateID: agg, EventType: "D", Payload: (*struct{})(nil)},
	}
	if err := inTx(t, func(tx *sql.Tx) error {
		return outbox.WriteBatch(context.Background(), tx, events, outbox.WithSchema(schema))
	}); err != nil {
		t.Fatal(err)
	}
	if err := outbox.WriteBatch(context.Background(), db, nil, outbox.WithSchema(schema)); err != nil {
		t.Fatalf("an empty batch: %v", err)
	}
	got := rows(t, agg)
	var types, payloads []string
	for _, r := range got {
		types = append(types, r.EventType)
		payloads = append(payloads, fmt.Sprintf("%v:%s", r.Payload.Valid, r.Payload.String))
		if r.Headers.Valid {
			t.Fatalf("headers %q without any", r.Headers.String)
		}
	}
	if strings.Join(types, ",") != "A,B,C,D" || strings.Join(payloads, ",") != `true:{"n": 1},true:[2],false:,false:` {
		t.Fatalf("types %v payloads %v", types, payloads)
	}
}

func TestTraceContextIsOptionalAndNeverOverridesTheEvents(t *testing.T) {
	agg := id(t)
	mine := "00-11111111111111111111111111111111-2222222222222222-01"
	err := inTx(t, func(tx *sql.Tx) error {
		return outbox.WriteBatch(context.Background(), tx, []outbox.Event{
			{AggregateType: "order", AggregateID: agg, EventType: "Own", Headers: map[string]string{"traceparent": mine}},
			{AggregateType: "order", AggregateID: agg, EventType: "Garbled"},
		}, outbox.WithSchema(schema), outbox.WithTraceContext(func(context.Context) (string, string) { return "not-a-traceparent", "x" }))
	})
	if err != nil {
		t.Fatal(err)
	}
	got := rows(t, agg)
	if len(got) != 2 || got[0].Headers.String != `{"traceparent": "`+mine+`"}` || got[1].Headers.Valid {
		t.Fatalf("rows %+v", got)
	}
}

func TestWritesOnAConnectionWithoutASchemaGoToTheSearchPath(t *testing.T) {
	agg := id(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SET search_path TO orders"); err != nil {
		t.Fatal(err)
	}
	if err := outbox.Write(ctx, conn, outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "X"}); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, "RESET search_path"); err != nil {
		t.Fatal(err)
	}
	if n := len(rows(t, agg)); n != 1 {
		t.Fatalf("%d rows", n)
	}
	// A failing insert (no outbox on the search path) is wrapped, not swallowed.
	err = outbox.Write(ctx, conn, outbox.Event{AggregateType: "order", AggregateID: agg, EventType: "X"})
	if err == nil || !strings.Contains(err.Error(), "outbox: insert into outbox") {
		t.Fatalf("err %v", err)
	}
}
