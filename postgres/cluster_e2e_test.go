package postgres

// Issue 7, one upstream fetch across replicas: three `pullsecret serve`
// replicas with a cluster section, on one PostgreSQL database (the fill
// leases) and one shared cache root, clients spread round-robin on a cold
// blob the upstream sends slowly. The upstream must send it once; every
// client must get verified bytes; a registry token issued by one replica
// must be accepted by another (the shared signing key).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/s3test"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/registry"
)

const clusterCanary = "canary-cluster-pw-93e1"

// world is a cluster of `pullsecret serve` replicas and its upstream.
type world struct {
	ctx     context.Context
	bin     string
	up      *registry.Registry
	blob    v1.Hash
	tok     string
	size    int64
	dsn     string
	s3      *s3test.Server
	servers []*testbin.Server
	hosts   []string
	envs    [][]string
	configs []string
}

// s3SecretEnv names the variable the replicas read the S3 secret key from.
const s3SecretEnv = "PULLSECRET_TEST_S3_SECRET"

// startCluster starts n replicas, their cache on one versitygw bucket and
// their metadata in one PostgreSQL database, in front of an upstream that
// trickles a blob of size bytes out, 256 KiB per step.
func startCluster(t *testing.T, ctx context.Context, n int, size int64, step time.Duration) *world {
	t.Helper()
	w := &world{ctx: ctx, size: size, s3: s3test.Start(t)}
	pgtest.Shared(t)
	dsn := pgtest.DSN(t)
	w.dsn = dsn
	bin := testbin.Build(t, "pullsecret")

	// The blob trickles out, so that every client arrives mid-fill.
	slow := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
				next.ServeHTTP(&trickle{ResponseWriter: rw, step: step}, r)
				return
			}
			next.ServeHTTP(rw, r)
		})
	}
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": clusterCanary}), registry.WithHandlerWrapper(slow))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = up.Close() })
	blob, err := up.SeedBlob(ctx, "team/app", size, registry.RandSeed(3))
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	dsnFile := write("dsn", dsn)
	// The files every replica shares, made once by `pullsecret cluster
	// init` (below) as an operator does before the first rollout.
	shared := filepath.Join(dir, "shared")
	secretFile := filepath.Join(shared, "cluster-secret")
	keyFile := filepath.Join(shared, "key")
	signingFile := filepath.Join(shared, proxy.SigningKeysFile)
	p := w.s3.Parameters()

	config := func(advertise, id string) string {
		return fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\n"+
			"metadata: {driver: postgres, dsn_file: %s}\n"+
			"cache: {driver: s3-aws, spool_dir: %s, parameters: {bucket: %s, region: %s, regionendpoint: %s, forcepathstyle: true, accesskey: %s, secretkey: '${%s}'}}\n"+
			"cluster: {replica_id: %s, advertise: %q, secret_file: %s, signing_key_file: %s, lease_ttl: 2s}\n",
			up.Host(), dsnFile, filepath.Join(dir, "spool-"+id), p["bucket"], p["region"], p["regionendpoint"], p["accesskey"], s3SecretEnv,
			id, advertise, secretFile, signingFile)
	}
	cli := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "pullsecret"), args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "PULLSECRET_HOME=" + filepath.Join(dir, "cli"),
			"PULLSECRET_KEY_FILE=" + keyFile, s3SecretEnv + "=" + w.s3.SecretKey, "PULLSECRET_CONFIG=" + write("cli.yaml", config("http://127.0.0.1:1", "cli"))}
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("pullsecret %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		if strings.Contains(out.String()+errb.String(), clusterCanary) {
			t.Fatal("the CLI printed the upstream password")
		}
		return out.String()
	}
	cli("", "cluster", "init", shared)
	cli(clusterCanary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(cli("", "token", "create", "--project", "acme", "--scope", "pull"))

	var servers []*testbin.Server
	t.Cleanup(func() {
		for i, s := range servers {
			if strings.Contains(s.Logs(), clusterCanary) || strings.Contains(s.Logs(), tok) || strings.Contains(s.Logs(), w.s3.SecretKey) {
				t.Errorf("replica %d logged a credential", i+1)
			}
			if t.Failed() {
				t.Logf("replica %d:\n%s", i+1, s.Logs())
			}
		}
	})
	for i := range n {
		host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
		env := []string{"PULLSECRET_HOME=" + filepath.Join(dir, fmt.Sprintf("home%d", i)), "PULLSECRET_KEY_FILE=" + keyFile,
			s3SecretEnv + "=" + w.s3.SecretKey}
		cfg := config("http://"+host, fmt.Sprintf("replica-%d", i+1))
		servers = append(servers, testbin.ServeAt(t, bin, host, env, cfg))
		w.hosts, w.envs, w.configs = append(w.hosts, host), append(w.envs, env), append(w.configs, cfg)
	}

	w.bin, w.up, w.blob, w.tok, w.servers = bin, up, blob, tok, servers
	return w
}

func TestClusterOneFetchAcrossReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs three pullsecret serve processes")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := startCluster(t, ctx, 3, 64<<20, 5*time.Millisecond)
	servers, blob, tok := w.servers, w.blob, w.tok
	up := w.up

	// A registry token from replica 1 works on replica 2.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, servers[0].URL+"/token?service=pullsecret&scope=repository:up/team/app:pull", nil)
	req.SetBasicAuth("ci", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var tr struct {
		Token string `json:"token"`
	}
	err = json.NewDecoder(resp.Body).Decode(&tr)
	resp.Body.Close()
	if err != nil || tr.Token == "" {
		t.Fatalf("token from replica 1: %d %v", resp.StatusCode, err)
	}
	req, _ = http.NewRequestWithContext(ctx, http.MethodHead, servers[1].URL+"/v2/up/team/app/blobs/"+blob.String(), nil)
	req.Header.Set("Authorization", "Bearer "+tr.Token)
	if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("replica 2 with replica 1's registry token: %v %v", resp.Status, err)
	}
	resp.Body.Close()

	// 30 concurrent cold pulls, round-robin over the replicas.
	const clients = 30
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, servers[i%3].URL+"/v2/up/team/app/blobs/"+blob.String(), nil)
			req.SetBasicAuth("ci", tok)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			h := sha256.New()
			n, err := io.Copy(h, resp.Body)
			if err == nil && (resp.StatusCode != http.StatusOK || n != w.size || "sha256:"+fmt.Sprintf("%x", h.Sum(nil)) != blob.String()) {
				err = fmt.Errorf("client %d via replica %d: status %d, %d bytes, digest %x", i, i%3+1, resp.StatusCode, n, h.Sum(nil))
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := up.BlobFetches(blob.String()); n != 1 {
		t.Errorf("the upstream sent the blob %d times to three replicas, want 1", n)
	}

	// The audit trail, in the database: each of the 30 pulls once, allowed,
	// for acme, by the token's id, from the replica that served it.
	db := open(t, w.dsn)
	tokID := tok[len("pst_") : len("pst_")+16]
	var pulls, replicas int
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		err := db.pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT event->>'replica') FROM audit_events
			WHERE project = 'acme' AND decision = 'allowed' AND event->>'action' = 'pull'
			AND event->>'digest' = $1 AND event->>'token_id' = $2 AND event->>'via' = 'proxy'`,
			blob.String(), tokID).Scan(&pulls, &replicas)
		if err != nil {
			t.Fatal(err)
		}
		if pulls >= clients || time.Now().After(deadline) {
			break
		}
	}
	if pulls != clients || replicas != 3 {
		t.Errorf("audit: %d allowed pulls of the blob from %d replicas, want %d from 3", pulls, replicas, clients)
	}
	var leaks int
	if err := db.pool.QueryRow(ctx, `SELECT count(*) FROM audit_events WHERE event::text LIKE '%' || $1 || '%' OR event::text LIKE '%' || $2 || '%'`,
		tok, clusterCanary).Scan(&leaks); err != nil || leaks != 0 {
		t.Errorf("audit records holding the token or the password: %d (%v)", leaks, err)
	}
}

// trickle writes the response in 256 KiB steps with a pause between them.
type trickle struct {
	http.ResponseWriter
	step time.Duration
}

func (t *trickle) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 256<<10)
		m, err := t.ResponseWriter.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		if f, ok := t.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		time.Sleep(t.step)
		p = p[k:]
	}
	return n, nil
}

func (t *trickle) ReadFrom(r io.Reader) (int64, error) { return io.Copy(struct{ io.Writer }{t}, r) }

// pull GETs the blob through s with the project token and returns how many
// bytes arrived, whether they are the whole verified blob, and the error.
func (w *world) pull(s *testbin.Server, progress func(int64)) (int64, bool, error) {
	req, _ := http.NewRequestWithContext(w.ctx, http.MethodGet, s.URL+"/v2/up/team/app/blobs/"+w.blob.String(), nil)
	req.SetBasicAuth("ci", w.tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, false, fmt.Errorf("status %d", resp.StatusCode)
	}
	h := sha256.New()
	var n int64
	buf := make([]byte, 64<<10)
	for {
		k, err := resp.Body.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if progress != nil {
			progress(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return n, false, err
		}
	}
	return n, n == w.size && fmt.Sprintf("sha256:%x", h.Sum(nil)) == w.blob.String(), nil
}

// pullResult is how one client's pull of the blob ended.
type pullResult struct {
	n   int64
	ok  bool
	err error
}

// pullAsync starts a pull of the blob through s; going is closed once at
// bytes have arrived.
func (w *world) pullAsync(s *testbin.Server, at int64) (done <-chan pullResult, going <-chan struct{}) {
	d, g := make(chan pullResult, 1), make(chan struct{})
	var once sync.Once
	go func() {
		n, ok, err := w.pull(s, func(n int64) {
			if n >= at {
				once.Do(func() { close(g) })
			}
		})
		d <- pullResult{n, ok, err}
	}()
	return d, g
}

// startFillAndJoin starts a cold pull through filler and, once 1 MiB is
// through, one through joiner, which then streams from the filler; it
// returns when the joiner has 512 KiB.
func (w *world) startFillAndJoin(t *testing.T, filler, joiner *testbin.Server) (first, second <-chan pullResult) {
	t.Helper()
	first, going := w.pullAsync(filler, 1<<20)
	select {
	case <-going:
	case <-w.ctx.Done():
		t.Fatal("the pull through the filler never got going")
	}
	second, joined := w.pullAsync(joiner, 512<<10)
	select {
	case <-joined:
	case <-w.ctx.Done():
		t.Fatal("the pull through the joining replica never got going")
	}
	return first, second
}

// The filler replica stops mid-fill while a client on the other replica
// streams from it.
//
// Killed with SIGKILL: the client on the other replica still finishes with
// verified bytes (its replica takes the lease over and resumes from the
// upstream), nothing partial is ever served, and the restarted replica
// serves the blob normally.
//
// Stopped as Kubernetes stops a pod (SIGTERM): it drains instead of dying.
// Its own client and the other replica's both finish with verified bytes
// from the one upstream fetch (no takeover), and it exits cleanly.
func TestClusterFillerStops(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs pullsecret serve processes")
	}
	t.Parallel()
	for _, tc := range []struct {
		name string
		stop func(t *testing.T, w *world, first, second <-chan pullResult)
	}{
		{"SIGKILL", func(t *testing.T, w *world, _, second <-chan pullResult) {
			filler, other := w.servers[0], w.servers[1]
			filler.Kill(t)
			if r := <-second; r.err != nil || !r.ok {
				t.Fatalf("the client on replica 2 after the filler's death: %d bytes, verified %v, %v", r.n, r.ok, r.err)
			}
			if !strings.Contains(other.Logs(), "waiting for its lease") && !strings.Contains(other.Logs(), "peer stream broke") {
				t.Errorf("replica 2 does not say it took over the fill:\n%s", other.Logs())
			}
			// Restarted, replica 1 serves the blob (from the shared cache).
			restarted := testbin.ServeAt(t, w.bin, w.hosts[0], w.envs[0], w.configs[0])
			w.servers = append(w.servers, restarted)
			if n, ok, err := w.pull(restarted, nil); err != nil || !ok {
				t.Fatalf("the restarted replica: %d bytes, verified %v, %v", n, ok, err)
			}
		}},
		{"SIGTERM", func(t *testing.T, w *world, first, second <-chan pullResult) {
			filler, other := w.servers[0], w.servers[1]
			filler.Terminate(t)
			for i, ch := range []<-chan pullResult{first, second} {
				if r := <-ch; r.err != nil || !r.ok {
					t.Errorf("the client on replica %d across the filler's shutdown: %d bytes, verified %v, %v", i+1, r.n, r.ok, r.err)
				}
			}
			if err := filler.Wait(t, 60*time.Second); err != nil {
				t.Errorf("the filler exited with %v:\n%s", err, filler.Logs())
			}
			if n := w.up.BlobFetches(w.blob.String()); n != 1 {
				t.Errorf("upstream fetches of the blob: %d, want 1 (a drain needs no takeover)", n)
			}
			if strings.Contains(other.Logs(), "peer stream broke") {
				t.Errorf("replica 2 lost the peer stream during a graceful shutdown:\n%s", other.Logs())
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			w := startCluster(t, ctx, 2, 16<<20, 40*time.Millisecond)
			first, second := w.startFillAndJoin(t, w.servers[0], w.servers[1])
			if n := w.up.BlobFetches(w.blob.String()); n != 0 {
				t.Fatalf("the upstream finished %d fetches before the filler stopped: the blob was not mid-fill", n)
			}
			tc.stop(t, w, first, second)
		})
	}
}
