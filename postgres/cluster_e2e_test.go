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

	"github.com/opencontainers/go-digest"

	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/registry"
)

const clusterCanary = "canary-cluster-pw-93e1"

func TestClusterOneFetchAcrossReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs three pullsecret serve processes")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pgtest.Shared(t)
	dsn := pgtest.DSN(t)
	bin := testbin.Build(t, "pullsecret")

	// The blob trickles out, so that every client arrives mid-fill.
	slow := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
				next.ServeHTTP(&trickle{ResponseWriter: w}, r)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": clusterCanary}), registry.WithHandlerWrapper(slow))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	const size = 16 << 20
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
	secretFile := write("cluster-secret", "a-cluster-secret-of-at-least-32-bytes-0123456789")
	keyFile := filepath.Join(dir, "master.key")
	// The shared signing keys, made once (as an operator does before the
	// first rollout) and mounted by every replica.
	if _, err := proxy.LoadSigner(filepath.Join(dir, "signing")); err != nil {
		t.Fatal(err)
	}
	signingFile := filepath.Join(dir, "signing", proxy.SigningKeysFile)
	cacheRoot := filepath.Join(dir, "cache")

	config := func(advertise, id string) string {
		return fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\n"+
			"metadata: {driver: postgres, dsn_file: %s}\ncache: {root: %s}\n"+
			"cluster: {replica_id: %s, advertise: %q, secret_file: %s, signing_key_file: %s, lease_ttl: 2s}\n",
			up.Host(), dsnFile, cacheRoot, id, advertise, secretFile, signingFile)
	}
	cli := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "pullsecret"), args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "PULLSECRET_HOME=" + filepath.Join(dir, "cli"),
			"PULLSECRET_KEY_FILE=" + keyFile, "PULLSECRET_CONFIG=" + write("cli.yaml", config("http://127.0.0.1:1", "cli"))}
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
	cli(clusterCanary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(cli("", "token", "create", "--project", "acme", "--scope", "pull"))

	var servers []*testbin.Server
	t.Cleanup(func() {
		for i, s := range servers {
			if strings.Contains(s.Logs(), clusterCanary) || strings.Contains(s.Logs(), tok) {
				t.Errorf("replica %d logged a credential", i+1)
			}
			if t.Failed() {
				t.Logf("replica %d:\n%s", i+1, s.Logs())
			}
		}
	})
	for i := range 3 {
		host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
		env := []string{"PULLSECRET_HOME=" + filepath.Join(dir, fmt.Sprintf("home%d", i)), "PULLSECRET_KEY_FILE=" + keyFile}
		servers = append(servers, testbin.ServeAt(t, bin, host, env, config("http://"+host, fmt.Sprintf("replica-%d", i+1))))
	}

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

	// 12 concurrent cold pulls, round-robin over the replicas.
	const clients = 12
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
			if err == nil && (resp.StatusCode != http.StatusOK || n != size || "sha256:"+fmt.Sprintf("%x", h.Sum(nil)) != blob.String()) {
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
	d := digest.Digest(blob.String())
	if _, err := os.Stat(filepath.Join(cacheRoot, "blobs", d.Algorithm().String())); err != nil {
		t.Logf("cache layout: %v", err) // informative: the layout is the cache's business
	}
}

// trickle writes the response in 256 KiB steps with a pause between them.
type trickle struct{ http.ResponseWriter }

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
		time.Sleep(20 * time.Millisecond)
		p = p[k:]
	}
	return n, nil
}

func (t *trickle) ReadFrom(r io.Reader) (int64, error) { return io.Copy(struct{ io.Writer }{t}, r) }
