// Package pgtest runs a real PostgreSQL server for tests: initdb into a
// temporary folder, then postgres on a free loopback port, with password
// authentication (scram-sha-256) so that tests can check that the password
// of a DSN never shows.
//
// One server serves a test package (started on first use, stopped by Main)
// and every test gets a database of its own:
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
//
//	func TestX(t *testing.T) {
//		dsn := pgtest.DSN(t) // a fresh, empty database; dropped at cleanup
//	}
//
// The binaries come from the Debian package postgresql (.ci/install-clients.sh
// installs it). When they are missing the test is skipped, and fails instead
// when CI or PULLSECRET_REQUIRE_CLIENTS is set (the policy of
// internal/clients.Require). PostgreSQL refuses to run as root: as root, the
// server runs as the user postgres (else nobody), in a folder it owns.
//
// Start, without a testing.T, also serves internal/replicas: the local
// cluster of `make replicas` and the replica benchmark.
package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/freeport"
)

// InstallHint says how to get the server binaries.
const InstallHint = "apt-get install -y postgresql"

// Server is a running PostgreSQL server.
type Server struct {
	// Host and Port are where it listens (127.0.0.1, TCP only).
	Host string
	Port int
	// User and Password are the superuser's. Password is random: tests
	// grep output for it.
	User, Password string

	dir  string // owned by the server's user; removed by Stop
	bin  string
	data string
	as   runAs
	out  *logBuffer
	pid  int
	done chan struct{} // closed once postgres has exited
	seq  atomic.Int64
}

// shared is the server of this test package, started on first use.
var shared struct {
	once sync.Once
	srv  *Server
	err  error
}

// Main runs the package's tests and then stops its server, if one was
// started. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if shared.srv != nil {
		if err := shared.srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest:", err)
		}
	}
	os.Exit(code)
}

// Shared returns the package's server, starting it on first use. A missing
// installation skips the test (fails it under CI).
func Shared(t testing.TB) *Server {
	t.Helper()
	bin := Require(t)
	shared.once.Do(func() { shared.srv, shared.err = Start(bin) })
	if shared.err != nil {
		t.Fatalf("pgtest: %v", shared.err)
	}
	return shared.srv
}

// DSN creates a fresh, empty database on the package's server for t and
// returns its connection string. The database is dropped at cleanup.
func DSN(t testing.TB) string {
	t.Helper()
	return Shared(t).NewDatabase(t)
}

// NewDatabase creates an empty database for t (dropped at cleanup) and
// returns its connection string.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("t%d_%s", s.seq.Add(1), sanitize(t.Name()))
	if len(name) > 63 {
		name = name[:63]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.admin(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// FORCE: a test that leaked a connection must not keep its
		// database, nor fail the next test.
		if err := s.admin(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return s.DSNFor(name)
}

// DSNFor is the connection string of database name as the superuser.
func (s *Server) DSNFor(name string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(s.User, s.Password),
		Host:     net.JoinHostPort(s.Host, strconv.Itoa(s.Port)),
		Path:     "/" + name,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// admin runs one statement in the maintenance database.
func (s *Server) admin(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, s.DSNFor("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql)
	return err
}

func sanitize(name string) string {
	b := []byte(strings.ToLower(name))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			b[i] = '_'
		}
	}
	return string(b)
}

// Require skips the test unless the server binaries are installed (fails
// it under CI) and returns the folder that holds initdb and postgres.
func Require(t testing.TB) string {
	t.Helper()
	bin, err := LookBin()
	if err == nil {
		return bin
	}
	clients.Unavailable(t, "pgtest: "+err.Error()+" ("+InstallHint+"; or run .ci/install-clients.sh)")
	return ""
}

// LookBin finds the folder of initdb and postgres: $PULLSECRET_PG_BIN,
// then initdb on PATH (symlinks followed, as Debian links only some of
// the binaries), then the newest /usr/lib/postgresql/<version>/bin.
func LookBin() (string, error) {
	var dirs []string
	if d := os.Getenv("PULLSECRET_PG_BIN"); d != "" {
		dirs = append(dirs, d)
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			dirs = append(dirs, filepath.Dir(r))
		}
	}
	versions, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(versions, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	dirs = append(dirs, versions...)
	for _, d := range dirs {
		if isExec(filepath.Join(d, "initdb")) && isExec(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("PostgreSQL server binaries (initdb, postgres) not found in $PULLSECRET_PG_BIN, PATH or /usr/lib/postgresql/*/bin: %w", exec.ErrNotFound)
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// runAs is who the server runs as.
type runAs struct {
	cred *syscall.Credential // nil: this process's user
	uid  int
	gid  int
}

// serverUser: PostgreSQL will not run as root, so a root test process runs
// it as postgres (the Debian package's user), else nobody.
func serverUser() (runAs, error) {
	if os.Geteuid() != 0 {
		return runAs{uid: os.Geteuid(), gid: os.Getegid()}, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil || uid == 0 {
			continue
		}
		return runAs{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, uid: uid, gid: gid}, nil
	}
	return runAs{}, errors.New("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
}

// tempBase picks a folder for the server's files that the server's user
// can reach: $TMPDIR may be a folder only root may enter.
func tempBase(as runAs) string {
	cands := []string{os.TempDir(), "/tmp", "/var/tmp", "/dev/shm"}
	if as.cred == nil {
		return cands[0]
	}
	for _, c := range cands {
		if reachableByOthers(c) {
			return c
		}
	}
	return "/tmp"
}

// reachableByOthers reports whether every folder from / down to dir may be
// entered by any user.
func reachableByOthers(dir string) bool {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return false
	}
	for {
		fi, err := os.Stat(dir)
		if err != nil || !fi.IsDir() || fi.Mode().Perm()&0o001 == 0 {
			return false
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return true
		}
		dir = parent
	}
}

// Start initialises and starts a server from the binaries in bin. Stop it
// when done; it also dies with this process.
func Start(bin string) (*Server, error) {
	as, err := serverUser()
	if err != nil {
		return nil, err
	}
	base := tempBase(as)
	removeStale(base)
	dir, err := os.MkdirTemp(base, "pgtest-")
	if err != nil {
		return nil, fmt.Errorf("temporary folder: %w", err)
	}
	s := &Server{Host: "127.0.0.1", User: "postgres", dir: dir, out: &logBuffer{}}
	fail := func(err error) (*Server, error) {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := os.Chown(dir, as.uid, as.gid); err != nil {
		return fail(fmt.Errorf("hand %s to uid %d: %w", dir, as.uid, err))
	}
	pw := make([]byte, 12)
	if _, err := rand.Read(pw); err != nil {
		return fail(err)
	}
	s.Password = "pgtest-" + hex.EncodeToString(pw)
	// The password goes to initdb in a file, never on a command line.
	pwFile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwFile, []byte(s.Password+"\n"), 0o600); err != nil {
		return fail(err)
	}
	if err := os.Chown(pwFile, as.uid, as.gid); err != nil {
		return fail(err)
	}
	data := filepath.Join(dir, "data")
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", s.User, "--pwfile", pwFile,
		"-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	initdb.Dir = dir
	initdb.Env = serverEnv(dir)
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: as.cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		return fail(fmt.Errorf("initdb: %v\n%s", err, out))
	}
	os.Remove(pwFile)
	s.bin, s.data, s.as = bin, data, as
	for attempt := 0; ; attempt++ {
		err := s.start(bin, data, as)
		if err == nil {
			return s, nil
		}
		s.Port = 0
		// A port taken between freePort and the listen: try another.
		if attempt == 2 || !strings.Contains(s.out.String(), "Address already in use") {
			return fail(fmt.Errorf("%v\n%s", err, s.out.String()))
		}
		s.out = &logBuffer{}
	}
}

// staleAge is how old a server folder must be before removeStale looks at
// it: younger ones may still be in initdb.
const staleAge = 10 * time.Minute

// removeStale removes the folders of servers whose test process died
// without stopping them (a panic, a timeout): the server died with it
// (parent-death signal), its files stayed. A folder whose postmaster is
// alive is left alone.
func removeStale(base string) {
	dirs, _ := filepath.Glob(filepath.Join(base, "pgtest-*"))
	for _, d := range dirs {
		fi, err := os.Stat(d)
		if err != nil || !fi.IsDir() || time.Since(fi.ModTime()) < staleAge {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(d, "data", "postmaster.pid")); err == nil {
			line, _, _ := strings.Cut(string(b), "\n")
			if pid, err := strconv.Atoi(strings.TrimSpace(line)); err == nil && pid > 0 && syscall.Kill(pid, 0) != syscall.ESRCH {
				continue
			}
		}
		os.RemoveAll(d)
	}
}

func serverEnv(dir string) []string {
	return []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "LANG=C", "LC_ALL=C", "TZ=UTC"}
}

func (s *Server) start(bin, data string, as runAs) error {
	port := s.Port
	if port == 0 {
		p, err := freeport.Get()
		if err != nil {
			return err
		}
		port = p
	}
	s.Port = port
	args := []string{"-D", data,
		"-c", "listen_addresses=" + s.Host,
		"-c", "port=" + strconv.Itoa(port),
		"-c", "unix_socket_directories=", // TCP only: no socket path to outlive us
		// A test server: durability is worth nothing, speed a lot.
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		// Parallel tests each open pools, and the replica tests several.
		"-c", "max_connections=400",
		"-c", "shared_buffers=32MB",
		"-c", "log_min_messages=warning",
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"), args...)
	cmd.Dir = s.dir
	cmd.Env = serverEnv(s.dir)
	cmd.Stdout, cmd.Stderr = s.out, s.out
	// The server dies with the test process (SIGQUIT: immediate shutdown,
	// which also ends its backends), and goes in its own process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: as.cred, Setpgid: true, Pdeathsig: syscall.SIGQUIT}
	started := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		// The parent-death signal follows the thread that started the
		// process: keep that thread for as long as the server runs.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			close(done)
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(done)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	s.pid, s.done = cmd.Process.Pid, done

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err := pgx.Connect(cctx, s.DSNFor("postgres"))
		ccancel()
		if err == nil {
			conn.Close(context.Background())
			return nil
		}
		select {
		case <-done:
			return errors.New("postgres exited")
		case <-ctx.Done():
			s.Stop()
			return errors.New("postgres not accepting connections after 60s")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Down shuts the server down (fast shutdown) and keeps its files, for a
// test of an outage; Up starts it again on the same port.
func (s *Server) Down() {
	select {
	case <-s.done:
	default:
		_ = syscall.Kill(s.pid, syscall.SIGINT)
		<-s.done
	}
}

// Up restarts a server that Down stopped, on the same port and data.
func (s *Server) Up() error { return s.start(s.bin, s.data, s.as) }

// Stop shuts the server down (fast shutdown, then SIGKILL after 15s) and
// removes its files.
func (s *Server) Stop() error {
	if s.done != nil {
		select {
		case <-s.done:
		default:
			_ = syscall.Kill(s.pid, syscall.SIGINT)
			select {
			case <-s.done:
			case <-time.After(15 * time.Second):
				_ = syscall.Kill(-s.pid, syscall.SIGKILL)
				<-s.done
			}
		}
	}
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("remove %s: %w", s.dir, err)
	}
	return nil
}

// Logs is what the server printed (warnings and errors).
func (s *Server) Logs() string { return s.out.String() }

// logBuffer keeps the last 64 KiB the server printed.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Write(p)
	if over := l.b.Len() - 64<<10; over > 0 {
		l.b.Next(over)
	}
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
