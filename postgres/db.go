package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// DB is a connection pool to the metadata database, schema up to date. The
// stores it hands out (Tokens, Secrets, AccessRecords, Leases, AuditLog)
// share its pool. It is safe for concurrent use.
type DB struct {
	pool   *pgxpool.Pool
	where  string   // user@host:port/database, for messages
	hidden []string // what no error may show: the password, as given and escaped
	log    *slog.Logger
	now    func() time.Time
	retain time.Duration
}

// Option configures Open.
type Option func(*DB)

// WithLogger sets where background failures (audit writes, pruning) and
// schema changes are reported (default: discard).
func WithLogger(l *slog.Logger) Option {
	return func(db *DB) {
		if l != nil {
			db.log = l
		}
	}
}

// WithClock sets the clock that access records are judged by (tests).
// Fill leases always use the database's clock.
func WithClock(now func() time.Time) Option {
	return func(db *DB) {
		if now != nil {
			db.now = now
		}
	}
}

// WithAccessRetention sets how old an access record gets before Prune
// deletes it (default 24h, as the file's).
func WithAccessRetention(d time.Duration) Option {
	return func(db *DB) {
		if d > 0 {
			db.retain = d
		}
	}
}

// DefaultAccessRetention is WithAccessRetention's default.
const DefaultAccessRetention = 24 * time.Hour

// errBadDSN says nothing of the DSN itself: parser errors quote it, and
// with it the password.
var errBadDSN = errors.New("postgres: the metadata DSN is not a valid PostgreSQL connection string " +
	"(want postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=verify-full, or key=value pairs)")

// Open connects to the database of dsn (a postgres:// URL or key=value
// pairs, as libpq takes them; pool_max_conns and the other pgxpool
// parameters too) and brings its schema up to date (Migrate). Close it
// when done.
func Open(ctx context.Context, dsn string, opts ...Option) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, errBadDSN
	}
	cc := cfg.ConnConfig
	db := &DB{
		where:  fmt.Sprintf("%s@%s:%d/%s", cc.User, cc.Host, cc.Port, cc.Database),
		log:    slog.New(slog.DiscardHandler),
		now:    time.Now,
		retain: DefaultAccessRetention,
	}
	if pw := cc.Password; pw != "" {
		db.hidden = []string{pw, url.QueryEscape(pw), url.PathEscape(pw)}
	}
	for _, o := range opts {
		o(db)
	}
	if cc.RuntimeParams == nil {
		cc.RuntimeParams = map[string]string{}
	}
	if cc.RuntimeParams["application_name"] == "" {
		cc.RuntimeParams["application_name"] = "pullsecret"
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, db.wrap("connect", err)
	}
	db.pool = pool
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, db.wrap("connect", err)
	}
	applied, newer, err := Migrate(ctx, pool)
	if err != nil {
		pool.Close()
		return nil, db.wrap("migrate", err)
	}
	if len(applied) > 0 {
		db.log.Info("metadata schema migrated", "database", db.where, "versions", applied)
	}
	if newer > 0 {
		db.log.Warn("the metadata schema is newer than this version of pullsecret knows (a rolling upgrade?)",
			"database", db.where, "schema_version", newer, "known", latestVersion())
	}
	return db, nil
}

// Close closes the pool.
func (db *DB) Close() { db.pool.Close() }

// String is the database as messages name it: user, host, port and
// database, never the password.
func (db *DB) String() string { return "postgres " + db.where }

// Ping checks that the database answers (a readiness probe).
func (db *DB) Ping(ctx context.Context) error {
	return db.wrap("ping", db.pool.Ping(ctx))
}

// wrap gives err the context of op and the database, and blanks anything
// in its text that is the password (a driver message, a network error
// quoting a URL): the error still unwraps to err, for errors.Is.
func (db *DB) wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	msg := fmt.Sprintf("postgres %s: %s: %v", db.where, op, err)
	for _, h := range db.hidden {
		if h != "" {
			msg = strings.ReplaceAll(msg, h, "xxxxx")
		}
	}
	return &dbError{msg: msg, err: err}
}

type dbError struct {
	msg string
	err error
}

func (e *dbError) Error() string { return e.msg }
func (e *dbError) Unwrap() error { return e.err }
