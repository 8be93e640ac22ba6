package pgtest

import (
	"context"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { Main(m) }

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestDatabasesAreSeparate: each test's database starts empty and sees
// nothing of another's.
func TestDatabasesAreSeparate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a, b := connect(t, DSN(t)), connect(t, DSN(t))
	if _, err := a.Exec(ctx, "CREATE TABLE only_in_a (x int)"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := b.QueryRow(ctx, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatal("a table of one test's database is in another's")
	}
}

// TestServer: the server runs unprivileged, on loopback, and wants the
// password.
func TestServer(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := DSN(t)
	conn := connect(t, dsn)
	var addr string
	if err := conn.QueryRow(ctx, "SELECT host(inet_server_addr())").Scan(&addr); err != nil {
		t.Fatal(err)
	}
	if addr != "127.0.0.1" {
		t.Errorf("server address %s, want 127.0.0.1", addr)
	}
	srv := Shared(t)
	// PostgreSQL refuses root: as root, the server runs as another user.
	st, err := os.Stat("/proc/" + strconv.Itoa(srv.pid))
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; os.Geteuid() == 0 && uid == 0 {
		t.Fatal("postgres runs as root")
	}
	u, _ := url.Parse(dsn)
	u.User = url.UserPassword(srv.User, "wrong-"+srv.Password)
	_, err = pgx.Connect(ctx, u.String())
	if err == nil || !strings.Contains(err.Error(), "password authentication failed") {
		t.Fatalf("connect with a wrong password: %v", err)
	}
	if strings.Contains(err.Error(), srv.Password) {
		t.Fatal("the error holds the password")
	}
}
