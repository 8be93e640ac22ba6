package testbin

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/freeport"
)

// Server is a `pullsecret serve` running as a process, as operators run it.
type Server struct {
	URL  string // http://127.0.0.1:PORT
	Host string // 127.0.0.1:PORT
	mu   sync.Mutex
	log  bytes.Buffer
	pid  int
	done chan struct{} // closed once the process has exited
	err  error         // how it exited; set before done is closed
}

// Write collects the server's stdout and stderr.
func (s *Server) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.Write(p)
}

// Logs is everything the server printed so far.
func (s *Server) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// Serve starts `pullsecret serve --config` from bin on a free loopback port
// with the given environment (PULLSECRET_HOME and the like; PATH and a
// fresh HOME are added), the config being config with the listen address
// put first, and waits until it answers /healthz. It is stopped at cleanup.
func Serve(t testing.TB, bin string, env []string, config string) *Server {
	t.Helper()
	return ServeAt(t, bin, fmt.Sprintf("127.0.0.1:%d", FreePort(t)), env, config)
}

// ServeAt is Serve on a chosen host:port, for configs that must name it.
func ServeAt(t testing.TB, bin, host string, env []string, config string) *Server {
	t.Helper()
	s := &Server{Host: host, URL: "http://" + host}
	cfg := filepath.Join(t.TempDir(), "serve.yaml")
	if err := os.WriteFile(cfg, []byte("listen: "+host+"\n"+config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bin, "pullsecret"), "serve", "--config", cfg)
	cmd.Env = append([]string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdout, cmd.Stderr = s, s
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	s.pid, s.done = cmd.Process.Pid, done
	go func() { s.err = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
			return // gone already (Kill): its pid may be someone else's now
		default:
		}
		syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s
			}
		}
		select {
		case <-done:
			t.Fatalf("pullsecret serve exited:\n%s", s.Logs())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("pullsecret serve not ready after 20s:\n%s", s.Logs())
		}
	}
}

// Kill ends the server with SIGKILL, as the OOM killer or a crash would:
// no graceful shutdown, no cleanup of its own. It returns once the process
// has exited, so its port and files are free for a restart.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	select {
	case <-s.done:
		t.Fatalf("pullsecret serve (pid %d) had exited before Kill:\n%s", s.pid, s.Logs())
	default:
	}
	if err := syscall.Kill(s.pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill pullsecret serve (pid %d): %v", s.pid, err)
	}
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("pullsecret serve (pid %d) still running 15s after SIGKILL", s.pid)
	}
}

// Terminate sends SIGTERM, as Kubernetes does to a pod it stops: the
// server shuts down gracefully. Wait tells how it ended.
func (s *Server) Terminate(t testing.TB) {
	t.Helper()
	select {
	case <-s.done:
		t.Fatalf("pullsecret serve (pid %d) had exited before Terminate:\n%s", s.pid, s.Logs())
	default:
	}
	if err := syscall.Kill(s.pid, syscall.SIGTERM); err != nil {
		t.Fatalf("terminate pullsecret serve (pid %d): %v", s.pid, err)
	}
}

// Wait waits up to timeout for the process to exit and returns its exit
// error (nil: status 0).
func (s *Server) Wait(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case <-s.done:
		return s.err
	case <-time.After(timeout):
		t.Fatalf("pullsecret serve (pid %d) still running after %s:\n%s", s.pid, timeout, s.Logs())
		return nil
	}
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	p, err := freeport.Get()
	if err != nil {
		t.Fatal(err)
	}
	return p
}
