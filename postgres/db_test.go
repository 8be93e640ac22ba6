package postgres

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/testbin"
)

// TestErrorsHideThePassword: whatever goes wrong with a DSN (it does not
// parse, nothing listens, the password is wrong), the error says so
// without the password.
func TestErrorsHideThePassword(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	const pw = "canary-dsn-pw-4f1a:@/?x"
	esc := url.QueryEscape(pw)
	good, err := url.Parse(pgtest.DSN(t))
	if err != nil {
		t.Fatal(err)
	}
	wrongPW := *good
	wrongPW.User = url.UserPassword(srv.User, pw)
	closed := wrongPW
	closed.Host = fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
	for _, tc := range []struct {
		name, dsn, want string
	}{
		{"unparsable URL", "postgres://u:" + esc + "@host:notaport/db", "not a valid PostgreSQL connection string"},
		{"unparsable key=value", "host=h port=x password='" + pw + "'", "not a valid PostgreSQL connection string"},
		{"nothing listens", closed.String(), "connect"},
		{"wrong password", wrongPW.String(), "password authentication failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			db, err := Open(ctx, tc.dsn)
			if err == nil {
				db.Close()
				t.Fatal("Open succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
			for _, form := range []string{pw, esc, url.PathEscape(pw), "canary-dsn-pw"} {
				if strings.Contains(msg, form) {
					t.Fatalf("error holds the password (%q): %s", form, msg)
				}
			}
		})
	}
	// The database named in messages has no password either.
	db := open(t, good.String())
	if s := db.String(); strings.Contains(s, srv.Password) || !strings.Contains(s, srv.User+"@127.0.0.1:") {
		t.Fatalf("String() = %q", s)
	}
}

// TestWrapKeepsTheCause: a wrapped database error still unwraps to the
// driver's, for errors.Is and errors.As.
func TestWrapKeepsTheCause(t *testing.T) {
	t.Parallel()
	db := open(t, pgtest.DSN(t))
	_, err := db.pool.Exec(context.Background(), "SELECT * FROM no_such_table")
	werr := db.wrap("probe", err)
	var pgErr *pgconn.PgError
	if !errors.As(werr, &pgErr) || pgErr.Code != "42P01" {
		t.Fatalf("wrapped error %v does not unwrap to the PostgreSQL error", werr)
	}
	if !strings.Contains(werr.Error(), "probe") || !strings.Contains(werr.Error(), db.where) {
		t.Fatalf("wrapped error %q lacks its context", werr)
	}
}
