// Package s3test runs a real S3-compatible server: versitygw (Apache-2.0)
// with its posix backend, as a process on a free loopback port, its objects
// in a folder of its own.
//
// Tests call Start, which skips the test when versitygw is not installed,
// and fails it instead when CI or PULLSECRET_REQUIRE_CLIENTS is set (the
// policy of internal/clients.Require): CI installs it
// (.ci/install-clients.sh).
//
//	srv := s3test.Start(t)
//	drv, err := factory.Create(ctx, "s3aws", srv.Parameters())
//
// Programs that are not tests (the local replicas recipe, the benchmarks,
// through internal/replicas) call Launch and Close:
//
//	bin, err := s3test.LookPath()
//	srv, err := s3test.Launch(bin, "")
//	defer srv.Close()
package s3test

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/freeport"
)

// Server is a running versitygw.
type Server struct {
	// Endpoint is the S3 endpoint URL: http://127.0.0.1:PORT.
	Endpoint string
	// Region is the server's region (us-east-1).
	Region string
	// AccessKey and SecretKey are the root account's keys.
	AccessKey, SecretKey string
	// Bucket exists, empty, when Start returns.
	Bucket string
	// Dir is the posix backend's top folder: Dir/<bucket>/<key> is an
	// object's file.
	Dir string

	bin  string // the versitygw binary, for Restart
	home string // versitygw's HOME
	tmp  string // a folder Launch made, removed by Close; "" when given one
	out  *logBuffer
	cmd  *exec.Cmd
	done chan struct{}
}

// Option configures Start and Launch.
type Option func(*options)

type options struct {
	access, secret, bucket string
}

// WithKeys sets the root account's access key and secret key (a canary
// secret, say). The defaults are fixed test values.
func WithKeys(access, secret string) Option {
	return func(o *options) { o.access, o.secret = access, secret }
}

// WithBucket names the bucket Start and Launch create (default "pullsecret").
func WithBucket(name string) Option { return func(o *options) { o.bucket = name } }

// LookPath finds versitygw in PATH, then where go install puts it:
// $GOBIN, $GOPATH/bin, ~/go/bin.
func LookPath() (string, error) { return clients.LookPath("versitygw") }

// Require skips the test unless versitygw is installed; under CI it fails
// it instead. It returns the binary's path.
func Require(t testing.TB) string {
	t.Helper()
	p, err := LookPath()
	if err == nil {
		return p
	}
	clients.Unavailable(t, "s3test: "+err.Error()+"; or run .ci/install-clients.sh")
	return ""
}

// Start starts versitygw on a free loopback port with one empty bucket and
// waits until it answers. It is stopped, by its PID, at cleanup.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	bin := Require(t)
	// With AWS_CA_BUNDLE set, aws-sdk-go v1 installs a transport of its own
	// in http.DefaultClient each time a session (a driver) is made: a data
	// race between parallel tests, and no use with a plain-HTTP endpoint.
	// (os.Unsetenv, not t.Setenv: tests calling Start run in parallel.)
	_ = os.Unsetenv("AWS_CA_BUNDLE")
	s, err := Launch(bin, t.TempDir(), opts...)
	if err != nil {
		t.Fatalf("s3test: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// Launch starts versitygw from bin on a free loopback port with one empty
// bucket and waits until it answers. Its files go in dir (objects in
// dir/s3, which becomes Dir), or, when dir is "", in a temporary folder
// that Close removes. It dies with this process; Close stops it sooner.
func Launch(bin, dir string, opts ...Option) (*Server, error) {
	o := options{access: "s3test-access", secret: "s3test-secret-key", bucket: "pullsecret"}
	for _, opt := range opts {
		opt(&o)
	}
	s := &Server{
		Region:    "us-east-1",
		AccessKey: o.access,
		SecretKey: o.secret,
		Bucket:    o.bucket,
		bin:       bin,
		out:       &logBuffer{},
		done:      make(chan struct{}),
	}
	if dir == "" {
		tmp, err := os.MkdirTemp("", "s3test-")
		if err != nil {
			return nil, fmt.Errorf("s3test: temporary folder: %w", err)
		}
		dir, s.tmp = tmp, tmp
	}
	s.Dir, s.home = filepath.Join(dir, "s3"), filepath.Join(dir, "home")
	fail := func(err error) (*Server, error) {
		if s.tmp != "" {
			_ = os.RemoveAll(s.tmp)
		}
		return nil, err
	}
	// The posix backend takes every folder of its top folder for a bucket.
	for _, d := range []string{s.home, filepath.Join(s.Dir, o.bucket)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fail(fmt.Errorf("s3test: %w", err))
		}
	}
	for attempt := 0; ; attempt++ {
		err := s.start()
		if err == nil {
			return s, nil
		}
		// A port taken between freePort and the listen: try another.
		if attempt == 2 || !strings.Contains(s.out.String(), "address already in use") {
			return fail(fmt.Errorf("%w\n%s", err, s.out.String()))
		}
		s.out = &logBuffer{}
		s.done = make(chan struct{})
		s.Endpoint = ""
	}
}

// Restart starts a stopped server again on the same address and folder:
// the end of an outage.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.done = make(chan struct{})
	if err := s.start(); err != nil {
		t.Fatalf("s3test: restart: %v\n%s", err, s.out.String())
	}
}

func (s *Server) start() error {
	addr := strings.TrimPrefix(s.Endpoint, "http://")
	if addr == "" {
		port, err := freeport.Get()
		if err != nil {
			return err
		}
		addr = fmt.Sprintf("127.0.0.1:%d", port)
	}
	s.Endpoint = "http://" + addr
	// The keys go through the environment, not the command line that ps
	// shows. --quiet: no line per request.
	cmd := exec.Command(s.bin, "--port", addr, "--quiet", "posix", s.Dir)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + s.home,
		"ROOT_ACCESS_KEY_ID=" + s.AccessKey,
		"ROOT_SECRET_ACCESS_KEY=" + s.SecretKey,
	}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start versitygw: %w", err)
	}
	s.cmd = cmd
	done := s.done
	go func() { _ = cmd.Wait(); close(done) }()

	deadline := time.Now().Add(30 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		// Any HTTP answer (403 to an unsigned request) means it serves.
		resp, err := client.Get(s.Endpoint + "/")
		if err == nil {
			_ = resp.Body.Close()
			return nil
		}
		select {
		case <-done:
			return errors.New("versitygw exited")
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return errors.New("versitygw not answering after 30s")
		}
	}
}

// Close stops the server and, when Launch made its folder, removes it.
func (s *Server) Close() error {
	s.stop()
	if s.tmp == "" {
		return nil
	}
	if err := os.RemoveAll(s.tmp); err != nil {
		return fmt.Errorf("s3test: remove %s: %w", s.tmp, err)
	}
	return nil
}

// Stop ends the server before the test does (an object store outage);
// cleanup does it otherwise.
func (s *Server) Stop() { s.stop() }

// stop ends the server: SIGTERM, then SIGKILL of its process group.
func (s *Server) stop() {
	if s.cmd == nil {
		return // never started
	}
	select {
	case <-s.done:
		return // exited: its pid may be someone else's now
	default:
	}
	_ = syscall.Kill(s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
}

// Logs is what versitygw printed.
func (s *Server) Logs() string { return s.out.String() }

// Parameters are the s3-aws storage driver's parameters for the bucket
// (distribution's names, for factory.Create).
func (s *Server) Parameters() map[string]any {
	return map[string]any{
		"bucket":         s.Bucket,
		"region":         s.Region,
		"regionendpoint": s.Endpoint,
		"forcepathstyle": true,
		"accesskey":      s.AccessKey,
		"secretkey":      s.SecretKey,
	}
}

// Files lists the files of the bucket's folder on disk (slash-separated,
// relative to it), the backend's own bookkeeping folders (those whose name
// starts with a dot, where incomplete multipart uploads live) excluded:
// what an S3 listing can show.
func (s *Server) Files(t testing.TB) []string {
	t.Helper()
	root := filepath.Join(s.Dir, s.Bucket)
	var out []string
	err := filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if de.IsDir() && p != root && strings.HasPrefix(de.Name(), ".") {
			return filepath.SkipDir
		}
		if !de.IsDir() {
			rel, _ := filepath.Rel(root, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("s3test: list %s: %v", root, err)
	}
	return out
}

type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
