// Package replicas starts a local cluster of `pullsecret serve` replicas,
// the way an operator runs them: N processes sharing one PostgreSQL database
// (metadata.driver postgres: tokens, sealed secrets, fill leases, audit) and
// one S3 bucket (cache.driver s3-aws, on versitygw), each with a cluster
// section, plus a round-robin front on one loopback address. It is for
// people trying the cluster on one machine (deploy/local, `make replicas`)
// and for the benchmarks; tests use it too, but it needs no testing.T.
//
//	c, err := replicas.Start(ctx, replicas.Options{Bin: "bin", Upstreams: map[string]string{"hub": "docker.io"}})
//	defer c.Close()
//	tok, err := c.CLI(ctx, "", "token", "create", "--project", "default", "--scope", "pull")
//	// pull through c.Front, or any of c.URLs
//
// PostgreSQL comes from the Debian package postgresql (internal/pgtest runs
// it), versitygw from `go install` (internal/s3test runs it).
package replicas

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pullsecret/pullsecret/internal/freeport"
	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/s3test"
	"github.com/pullsecret/pullsecret/proxy"
)

// Options say what to start.
type Options struct {
	// Bin is the folder holding the built pullsecret binary (`make build`
	// puts it in bin/).
	Bin string
	// Dir is the work folder: configs, keys, logs, the bucket's files,
	// spool folders. Empty: a temporary folder that Close removes. A given
	// folder is kept (its logs are worth reading after a run).
	Dir string
	// N is the number of replicas; 0 means 3.
	N int
	// Upstreams are the aliases every replica serves: name -> host[:port]
	// ("hub" -> "docker.io").
	Upstreams map[string]string
	// AllowPrivate is allow_private_upstreams: CIDR prefixes, addresses or
	// host names (an upstream on 127.0.0.1 needs "127.0.0.1/32").
	AllowPrivate []string
	// BasePort, when set, puts replica i on 127.0.0.1:BasePort+i; 0 picks
	// free ports.
	BasePort int
	// Front is the address of the round-robin front ("127.0.0.1:5080");
	// empty picks a free loopback port.
	Front string
	// LeaseTTL is cluster.lease_ttl; 0 keeps the server's default.
	LeaseTTL time.Duration
	// ReadyTimeout bounds the wait for every replica's /readyz; 0 means 60s.
	ReadyTimeout time.Duration
}

// Cluster is a running set of replicas and what they share.
type Cluster struct {
	// URLs are the replicas' base URLs (http://127.0.0.1:PORT), in order.
	URLs []string
	// Front is the round-robin front's base URL.
	Front string
	// Dir is the work folder.
	Dir string
	// Logs are the replicas' log files, in order.
	Logs []string
	// ConfigFile is the config the admin CLI takes (PULLSECRET_CONFIG): it
	// names the database, so `pullsecret secret create` and `pullsecret
	// token create` reach what the replicas read.
	ConfigFile string
	// KeyFile is the sealing key every replica and the CLI share
	// (PULLSECRET_KEY_FILE).
	KeyFile string
	// CLIHome is the data folder the admin CLI runs with (PULLSECRET_HOME).
	CLIHome string
	// Database names the database without its password:
	// postgres://USER@HOST:PORT/DB.
	Database string
	// BucketDir is the folder on disk holding the bucket's objects.
	BucketDir string

	bin     string
	ownDir  bool
	pg      *pgtest.Server
	s3      *s3test.Server
	procs   []*process
	front   *http.Server
	frontLn net.Listener
}

// s3SecretEnv is the variable the replicas read the S3 secret key from (the
// config says ${PULLSECRET_S3_SECRET_KEY}), so that no file holds it.
const s3SecretEnv = "PULLSECRET_S3_SECRET_KEY"

// dbName is the database the replicas share.
const dbName = "pullsecret"

// Start starts PostgreSQL, versitygw, the replicas and the front, and
// returns once every replica answers /readyz. On error, whatever was
// started is stopped again.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if o.N == 0 {
		o.N = 3
	}
	if o.N < 0 {
		return nil, fmt.Errorf("replicas: %d replicas", o.N)
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 60 * time.Second
	}
	bin, err := filepath.Abs(filepath.Join(o.Bin, "pullsecret"))
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("replicas: the pullsecret binary (make build): %w", err)
	}
	pgBin, err := pgtest.LookBin()
	if err != nil {
		return nil, fmt.Errorf("replicas: %w (%s)", err, pgtest.InstallHint)
	}
	s3Bin, err := s3test.LookPath()
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}

	c := &Cluster{bin: bin, Dir: o.Dir}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "pullsecret-replicas-"); err != nil {
			return nil, fmt.Errorf("replicas: work folder: %w", err)
		}
		c.ownDir = true
	} else {
		if c.Dir, err = filepath.Abs(c.Dir); err != nil {
			return nil, fmt.Errorf("replicas: %w", err)
		}
		if err := os.MkdirAll(c.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("replicas: work folder: %w", err)
		}
	}
	defer func() {
		if err != nil {
			_ = c.Close()
		}
	}()

	if c.pg, err = pgtest.Start(pgBin); err != nil {
		return nil, fmt.Errorf("replicas: start postgres: %w", err)
	}
	if err := createDatabase(ctx, c.pg.DSNFor("postgres"), dbName); err != nil {
		return nil, fmt.Errorf("replicas: create database: %w", err)
	}
	c.Database = (&url.URL{Scheme: "postgres", User: url.User(c.pg.User),
		Host: net.JoinHostPort(c.pg.Host, strconv.Itoa(c.pg.Port)), Path: "/" + dbName}).String()

	s3Secret, err := randomHex(24)
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}
	if c.s3, err = s3test.Launch(s3Bin, filepath.Join(c.Dir, "versitygw"), s3test.WithKeys("pullsecret-local", s3Secret)); err != nil {
		return nil, fmt.Errorf("replicas: start versitygw: %w", err)
	}
	c.BucketDir = filepath.Join(c.s3.Dir, c.s3.Bucket)

	f, err := writeShared(ctx, c.bin, c.Dir, c.pg.DSNFor(dbName))
	if err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}
	c.KeyFile = f.key
	c.CLIHome = filepath.Join(c.Dir, "cli")

	hosts := make([]string, o.N)
	for i := range hosts {
		port := o.BasePort + i
		if o.BasePort == 0 {
			if port, err = freeport.Get(); err != nil {
				return nil, fmt.Errorf("replicas: %w", err)
			}
		}
		hosts[i] = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	}

	// The CLI gets the database and the aliases only: its commands (secret,
	// token) touch no cache, so it needs neither the bucket's secret key
	// nor a cluster section.
	c.ConfigFile = filepath.Join(c.Dir, "cli.yaml")
	if err := os.WriteFile(c.ConfigFile, []byte(commonConfig(o, f)), 0o600); err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}

	logDir := filepath.Join(c.Dir, "logs")
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		return nil, fmt.Errorf("replicas: %w", err)
	}
	for i, host := range hosts {
		id := fmt.Sprintf("replica-%d", i+1)
		rdir := filepath.Join(c.Dir, id)
		if err := os.MkdirAll(rdir, 0o700); err != nil {
			return nil, fmt.Errorf("replicas: %w", err)
		}
		cfg := filepath.Join(rdir, "serve.yaml")
		if err := os.WriteFile(cfg, []byte(c.replicaConfig(o, f, id, host, rdir)), 0o600); err != nil {
			return nil, fmt.Errorf("replicas: %w", err)
		}
		logFile := filepath.Join(logDir, id+".log")
		env := []string{
			"PATH=" + os.Getenv("PATH"),
			"HOME=" + rdir,
			"PULLSECRET_HOME=" + filepath.Join(rdir, "home"),
			"PULLSECRET_KEY_FILE=" + f.key,
			s3SecretEnv + "=" + c.s3.SecretKey,
		}
		p, err := startProcess(bin, []string{"serve", "--config", cfg}, env, logFile)
		if err != nil {
			return nil, fmt.Errorf("replicas: start %s: %w", id, err)
		}
		c.procs = append(c.procs, p)
		c.URLs = append(c.URLs, "http://"+host)
		c.Logs = append(c.Logs, logFile)
	}
	rctx, cancel := context.WithTimeout(ctx, o.ReadyTimeout)
	defer cancel()
	for i, p := range c.procs {
		if err := waitReady(rctx, c.URLs[i], p); err != nil {
			return nil, fmt.Errorf("replicas: replica-%d (log %s): %w", i+1, c.Logs[i], err)
		}
	}

	if err := c.startFront(o.Front); err != nil {
		return nil, fmt.Errorf("replicas: front: %w", err)
	}
	return c, nil
}

// shared are the files every replica mounts.
type shared struct {
	dsn, key, clusterSecret, signingKeys string
}

// writeShared makes the shared files as an operator does before the first
// rollout: `pullsecret cluster init` (one sealing key, cluster secret and
// signing key set for every replica and the CLI; left to themselves, each
// would make keys of its own), and the DSN file.
func writeShared(ctx context.Context, bin, dir, dsn string) (shared, error) {
	keys := filepath.Join(dir, "keys")
	// A work folder used before keeps its keys (cluster init never
	// replaces one): the database is new each run, so they seal nothing yet.
	if _, err := os.Stat(filepath.Join(keys, "key")); errors.Is(err, fs.ErrNotExist) {
		cmd := exec.CommandContext(ctx, bin, "cluster", "init", keys)
		if out, err := cmd.CombinedOutput(); err != nil {
			return shared{}, fmt.Errorf("pullsecret cluster init: %w: %s", err, bytes.TrimSpace(out))
		}
	}
	f := shared{
		dsn:           filepath.Join(keys, "dsn"),
		key:           filepath.Join(keys, "key"),
		clusterSecret: filepath.Join(keys, "cluster-secret"),
		signingKeys:   filepath.Join(keys, proxy.SigningKeysFile),
	}
	if err := os.WriteFile(f.dsn, []byte(dsn+"\n"), 0o600); err != nil {
		return shared{}, fmt.Errorf("dsn file: %w", err)
	}
	return f, nil
}

// commonConfig is what the replicas and the CLI have alike.
func commonConfig(o Options, f shared) string {
	var b strings.Builder
	if len(o.AllowPrivate) > 0 {
		fmt.Fprintf(&b, "allow_private_upstreams: [%s]\n", quoteList(o.AllowPrivate))
	}
	if len(o.Upstreams) > 0 {
		b.WriteString("aliases:\n")
		for _, name := range slices.Sorted(maps.Keys(o.Upstreams)) {
			fmt.Fprintf(&b, "  %s: %s\n", strconv.Quote(name), strconv.Quote(o.Upstreams[name]))
		}
	}
	fmt.Fprintf(&b, "metadata: {driver: postgres, dsn_file: %s}\n", strconv.Quote(f.dsn))
	return b.String()
}

func (c *Cluster) replicaConfig(o Options, f shared, id, host, rdir string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "listen: %s\n", host)
	b.WriteString(commonConfig(o, f))
	p := c.s3.Parameters()
	fmt.Fprintf(&b, "cache: {driver: s3-aws, spool_dir: %s, parameters: {bucket: %s, region: %s, regionendpoint: %s, forcepathstyle: true, accesskey: %s, secretkey: '${%s}'}}\n",
		strconv.Quote(filepath.Join(rdir, "spool")), p["bucket"], p["region"], p["regionendpoint"], p["accesskey"], s3SecretEnv)
	fmt.Fprintf(&b, "cluster: {replica_id: %s, advertise: %s, secret_file: %s, signing_key_file: %s",
		id, strconv.Quote("http://"+host), strconv.Quote(f.clusterSecret), strconv.Quote(f.signingKeys))
	if o.LeaseTTL > 0 {
		fmt.Fprintf(&b, ", lease_ttl: %s", o.LeaseTTL)
	}
	b.WriteString("}\n")
	return b.String()
}

func quoteList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

// startFront serves the round-robin front. Each request goes to the next
// replica, so one client's requests scatter: its /token call, its blob GETs
// and the parts of a chunked push can each land on a different replica.
// That works because the registry tokens are signed with the shared signing
// keys and upload ids are sealed with a key derived from the cluster
// secret: no replica needs to have seen the client before. The Host header
// is kept, so the token realm in a challenge names the front.
func (c *Cluster) startFront(addr string) error {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	targets := make([]*url.URL, len(c.URLs))
	for i, u := range c.URLs {
		t, err := url.Parse(u)
		if err != nil {
			return err
		}
		targets[i] = t
	}
	var next atomic.Uint64
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(targets[(next.Add(1)-1)%uint64(len(targets))])
			r.Out.Host = r.In.Host
		},
		// Blobs stream through as they arrive.
		FlushInterval: -1,
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			DisableCompression:  true,
		},
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	c.frontLn = ln
	c.front = &http.Server{Handler: rp, ReadHeaderTimeout: 30 * time.Second}
	c.Front = "http://" + ln.Addr().String()
	go func() { _ = c.front.Serve(ln) }()
	return nil
}

// Env is the environment under which `pullsecret` admin commands reach the
// cluster's database with its sealing key (secret create, token create).
func (c *Cluster) Env() []string {
	return []string{
		"PULLSECRET_CONFIG=" + c.ConfigFile,
		"PULLSECRET_KEY_FILE=" + c.KeyFile,
		"PULLSECRET_HOME=" + c.CLIHome,
	}
}

// CLI runs `pullsecret args...` against the cluster with stdin as its
// standard input and returns its standard output.
func (c *Cluster) CLI(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + c.CLIHome}, c.Env()...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("pullsecret %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// Kill ends replica i (0-based) with SIGKILL, as a crash would, and waits
// for it to exit.
func (c *Cluster) Kill(i int) error {
	if i < 0 || i >= len(c.procs) {
		return fmt.Errorf("replicas: no replica %d", i)
	}
	return c.procs[i].kill()
}

// Close stops the front, the replicas (SIGTERM, then SIGKILL after 15s),
// versitygw and PostgreSQL, and removes the work folder if Start made it.
func (c *Cluster) Close() error {
	var errs []error
	if c.front != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := c.front.Shutdown(ctx); err != nil {
			_ = c.front.Close()
		}
		cancel()
	}
	for i, p := range c.procs {
		if err := p.terminate(15 * time.Second); err != nil {
			errs = append(errs, fmt.Errorf("replica-%d: %w", i+1, err))
		}
	}
	if c.s3 != nil {
		if err := c.s3.Close(); err != nil {
			errs = append(errs, fmt.Errorf("stop versitygw: %w", err))
		}
	}
	if c.pg != nil {
		if err := c.pg.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stop postgres: %w", err))
		}
	}
	if c.ownDir {
		if err := os.RemoveAll(c.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("replicas: close: %w", err)
	}
	return nil
}

// process is one `pullsecret serve`.
type process struct {
	pid  int
	log  string
	done chan struct{} // closed once it has exited
	err  error         // how it exited; set before done is closed
}

func startProcess(bin string, args, env []string, logFile string) (*process, error) {
	lf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	// Its own process group, and it dies with this process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &process{log: logFile, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal follows the thread that started the
		// process, not the process: keep that thread while it runs.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer lf.Close()
		if err := cmd.Start(); err != nil {
			started <- err
			close(p.done)
			return
		}
		p.pid = cmd.Process.Pid
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) kill() error {
	if p.exited() {
		return fmt.Errorf("pid %d had exited: %v", p.pid, p.err)
	}
	if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill pid %d: %w", p.pid, err)
	}
	<-p.done
	return nil
}

func (p *process) terminate(grace time.Duration) error {
	if p.exited() {
		return nil // its pid may be someone else's now
	}
	_ = syscall.Kill(p.pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
		_ = syscall.Kill(-p.pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("pid %d still running %s after SIGTERM: killed", p.pid, grace)
	}
}

// waitReady polls base/readyz until it answers 200.
func waitReady(ctx context.Context, base string, p *process) error {
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/readyz", nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("exited (%v):\n%s", p.err, tail(p.log, 4<<10))
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// tail is the end of a log file, for an error message.
func tail(path string, n int64) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if int64(len(b)) > n {
		b = b[int64(len(b))-n:]
	}
	return string(b)
}

func createDatabase(ctx context.Context, adminDSN, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, adminDSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	return err
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
