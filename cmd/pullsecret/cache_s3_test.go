package main

// Issue 4 item 1 and issue 7 item 1, as operators run it: `pullsecret
// serve` with its content cache on an object store through distribution's
// s3-aws driver, against a real S3 server (versitygw, internal/s3test).
// Replicas share the bucket; content appears there only complete and
// verified, also when a replica is killed mid-fill or mid-upload; the S3
// secret key shows up in no output.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/s3test"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/registry"
)

// s3Canary is the S3 secret key of these tests: it must appear in no output
// of the server, no response and no file of its home.
const s3Canary = "s3-canary-secret-d41c7e"

// s3SecretEnv passes the secret key to serve: the config file names it.
const s3SecretEnv = "PULLSECRET_TEST_S3_SECRET"

// s3Cluster is an upstream with one private repository, a bucket, and a
// data folder holding the project's pull secret and token; serve processes
// started from it share the bucket.
type s3Cluster struct {
	t        *testing.T
	e        *env
	bin      string
	s3       *s3test.Server
	endpoint string // what serve talks to: the server, or a front of it
	up       *registry.Registry
	tok      string
	spool    string
	servers  []*testbin.Server
	drv      storagedriver.StorageDriver
}

func newS3Cluster(t *testing.T, upstreamWrap func(http.Handler) http.Handler) *s3Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binary and runs pullsecret serve against an S3 server")
	}
	srv := s3test.Start(t, s3test.WithKeys("AKIDPULLSECRETTEST", s3Canary))
	c := &s3Cluster{t: t, e: newEnv(t), bin: testbin.Build(t, "pullsecret"), s3: srv, endpoint: srv.Endpoint}
	opts := []registry.Option{registry.WithHTPasswd(map[string]string{"bot": canary}), registry.WithFilesystem(t.TempDir())}
	if upstreamWrap != nil {
		opts = append(opts, registry.WithHandlerWrapper(upstreamWrap))
	}
	up, err := registry.Start(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = up.Close() })
	c.up = up
	c.e.must(canary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	c.tok = strings.TrimSpace(c.e.must("", "token", "create", "--project", "acme", "--scope", "pull"))
	c.spool = filepath.Join(t.TempDir(), "spool")
	// Registered before any server starts, so it runs once they have
	// stopped: their whole output.
	t.Cleanup(c.checkNoS3Secret)
	return c
}

// config is serve's configuration: the cache on the bucket, the secret
// key from the environment.
func (c *s3Cluster) config() string {
	return fmt.Sprintf(`allow_private_upstreams: [127.0.0.1/32]
aliases:
  up: %s
log: {level: debug}
cache:
  driver: s3-aws
  spool_dir: %s
  parameters:
    bucket: %s
    region: %s
    regionendpoint: %s
    forcepathstyle: true
    chunksize: 5242880
    accesskey: %s
    secretkey: ${%s}
`, c.up.Host(), c.spool, c.s3.Bucket, c.s3.Region, c.endpoint, c.s3.AccessKey, s3SecretEnv)
}

func (c *s3Cluster) env() []string {
	return []string{"PULLSECRET_HOME=" + c.e.home, s3SecretEnv + "=" + s3Canary}
}

// serve starts a replica on host ("" for a free port).
func (c *s3Cluster) serve(host string) *testbin.Server {
	c.t.Helper()
	if host == "" {
		host = fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(c.t))
	}
	s := testbin.ServeAt(c.t, c.bin, host, c.env(), c.config())
	c.servers = append(c.servers, s)
	return s
}

// checkNoS3Secret: the secret key in no server output and no file of the
// home or the spool.
func (c *s3Cluster) checkNoS3Secret() {
	for i, s := range c.servers {
		if strings.Contains(s.Logs(), s3Canary) {
			c.t.Errorf("serve #%d printed the S3 secret key:\n%s", i+1, s.Logs())
		}
	}
	for _, dir := range []string{c.e.home, c.spool} {
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), s3Canary) {
					c.t.Errorf("the S3 secret key in %s", p)
				}
			}
			return nil
		})
	}
}

// driver is an s3-aws driver on the bucket, straight to the server: what
// any replica would list and read.
func (c *s3Cluster) driver() storagedriver.StorageDriver {
	c.t.Helper()
	if c.drv == nil {
		drv, err := factory.Create(context.Background(), "s3aws", c.s3.Parameters())
		if err != nil {
			c.t.Fatal(err)
		}
		c.drv = drv
	}
	return c.drv
}

// objectsOf lists the bucket's objects that hold content of the digest
// (any key naming it, location links under repos/ aside) and every upload
// object, through the S3 API (a Walk of the bucket), and cross-checks the
// server's folder.
func (c *s3Cluster) objectsOf(d v1.Hash) []string {
	c.t.Helper()
	content := func(key string) bool {
		return strings.HasPrefix(key, "_uploads/") || strings.Contains(key, d.Hex) && !strings.HasPrefix(key, "repos/")
	}
	var viaAPI []string
	err := c.driver().Walk(context.Background(), "/", func(fi storagedriver.FileInfo) error {
		if key := strings.TrimPrefix(fi.Path(), "/"); !fi.IsDir() && content(key) {
			viaAPI = append(viaAPI, key)
		}
		return nil
	})
	if err != nil && !errors.As(err, new(storagedriver.PathNotFoundError)) {
		c.t.Fatalf("list the bucket: %v", err)
	}
	var onDisk []string
	for _, f := range c.s3.Files(c.t) {
		if content(f) {
			onDisk = append(onDisk, f)
		}
	}
	slices.Sort(viaAPI)
	slices.Sort(onDisk)
	if !slices.Equal(viaAPI, onDisk) {
		c.t.Fatalf("the S3 listing %q and the server's folder %q disagree", viaAPI, onDisk)
	}
	return viaAPI
}

func dataKey(kind string, d v1.Hash) string {
	return fmt.Sprintf("%s/sha256/%s/%s/data", kind, d.Hex[:2], d.Hex)
}

// waitObject waits until the entry's data object exists.
func (c *s3Cluster) waitObject(kind string, d v1.Hash) {
	c.t.Helper()
	want := dataKey(kind, d)
	deadline := time.Now().Add(30 * time.Second)
	for !slices.Contains(c.objectsOf(d), want) {
		if time.Now().After(deadline) {
			c.t.Fatalf("%s never appeared in the bucket", want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkObject reads the entry's object back and checks it is the whole,
// verified content, and that nothing else of the digest is in the bucket
// but its sidecars.
func (c *s3Cluster) checkObject(kind string, d v1.Hash, size int64) {
	c.t.Helper()
	rc, err := c.driver().Reader(context.Background(), "/"+dataKey(kind, d), 0)
	if err != nil {
		c.t.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	n, err := io.Copy(h, rc)
	if err != nil || n != size || hex.EncodeToString(h.Sum(nil)) != d.Hex {
		c.t.Fatalf("object of %s: %d of %d bytes, %v, digest match %v", d, n, size, err, hex.EncodeToString(h.Sum(nil)) == d.Hex)
	}
	// Besides the data: its sidecars (meta, accessed), no upload.
	for _, o := range c.objectsOf(d) {
		if !strings.HasPrefix(o, strings.TrimSuffix(dataKey(kind, d), "data")) {
			c.t.Errorf("stray object for %s: %s", d, o)
		}
	}
}

// getBlob GETs a blob through a replica with the project token, hashing
// the body; got counts the bytes as they arrive.
func (c *s3Cluster) getBlob(ctx context.Context, s *testbin.Server, d v1.Hash, got *atomic.Int64) s3BlobGET {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/v2/up/team/app/blobs/"+d.String(), nil)
	if err != nil {
		return s3BlobGET{err: err}
	}
	req.SetBasicAuth("ci", c.tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return s3BlobGET{err: err}
	}
	defer resp.Body.Close()
	h := sha256.New()
	var n int64
	buf := make([]byte, 64<<10)
	for {
		m, rerr := resp.Body.Read(buf)
		h.Write(buf[:m])
		n += int64(m)
		if got != nil {
			got.Add(int64(m))
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
	}
	return s3BlobGET{status: resp.StatusCode, n: n, hex: hex.EncodeToString(h.Sum(nil)), err: err}
}

type s3BlobGET struct {
	status int
	n      int64
	hex    string
	err    error
}

// TestServeS3Cache: pulls with crane through replicas on one bucket. The
// first pull fills the bucket; a second replica that never saw the image
// serves it from the bucket alone (no blob GET upstream), and still with
// the upstream stopped. Then the object store goes away: errors, no secret.
func TestServeS3Cache(t *testing.T) {
	t.Parallel()
	clients.Require(t, "crane")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := newS3Cluster(t, nil)
	img, err := c.up.SeedRandom(ctx, "team/app", "v1", registry.Layers(2), registry.LayerSize(6<<20), registry.RandSeed(71))
	if err != nil {
		t.Fatal(err)
	}
	manifest, _ := img.Digest()
	config, _ := img.ConfigName()
	blobs := map[v1.Hash]int64{}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		blobs[d], _ = l.Size()
	}
	rawConfig, _ := img.RawConfigFile()
	blobs[config] = int64(len(rawConfig))
	rawManifest, _ := img.RawManifest()

	a := c.serve("")
	b := c.serve("")
	cenv := clients.NewEnv(t)
	cenv.Login(a.Host, "ci", c.tok)
	cenv.Login(b.Host, "ci", c.tok)
	pull := func(s *testbin.Server, what string) {
		t.Helper()
		out := filepath.Join(t.TempDir(), "oci")
		r, err := cenv.Crane(ctx, "pull", "--insecure", "--format", "oci", s.Host+"/up/team/app:v1", out)
		if err != nil || r.ExitCode != 0 {
			t.Fatalf("%s: crane pull: %v\n%s\nserver:\n%s", what, err, r.Output(), s.Logs())
		}
		// crane verified every digest; the layout holds what was pulled.
		for d, size := range blobs {
			if fi, err := os.Stat(filepath.Join(out, "blobs", "sha256", d.Hex)); err != nil || fi.Size() != size {
				t.Fatalf("%s: blob %s in the layout: %v", what, d, err)
			}
		}
	}

	// 1. Cold, through replica A: the upstream sends each blob; the bucket
	// fills with complete, verified objects.
	pull(a, "cold pull through A")
	for d, size := range blobs {
		c.waitObject("blobs", d)
		c.checkObject("blobs", d, size)
	}
	c.waitObject("manifests", manifest)
	c.checkObject("manifests", manifest, int64(len(rawManifest)))
	for d := range blobs {
		if n := c.up.BlobFetches(d.String()); n != 1 {
			t.Errorf("cold pull: upstream sent blob %s %d times, want 1", d, n)
		}
	}

	// 2. Replica B has never seen the image: every blob from the bucket.
	c.up.ResetRequests()
	pull(b, "pull through B")
	for _, r := range c.up.Requests() {
		if r.Method == http.MethodGet && strings.Contains(r.Path, "/blobs/") {
			t.Errorf("replica B fetched a blob upstream: %s %s", r.Method, r.Path)
		}
	}

	// 3. The upstream goes away: B still serves the image (tag, manifest
	// and blobs cached, access proven within access_ttl).
	if err := c.up.Close(); err != nil {
		t.Fatal(err)
	}
	pull(b, "pull through B, upstream stopped")

	// 4. Metrics and error responses, then the object store goes away.
	responses := map[string]string{}
	get := func(name, url string, auth bool) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if auth {
			req.SetBasicAuth("ci", c.tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		responses[name] = fmt.Sprintf("%d %s", resp.StatusCode, body)
	}
	get("metrics", b.URL+"/metrics", false)
	if !strings.HasPrefix(responses["metrics"], "200 ") || !strings.Contains(responses["metrics"], "pullsecret_") {
		t.Fatalf("metrics: %.300s", responses["metrics"])
	}
	get("unknown blob", b.URL+"/v2/up/team/app/blobs/sha256:"+strings.Repeat("0", 64), true)
	get("bad token", b.URL+"/v2/up/team/app/manifests/v1", false)
	c.s3.Stop()
	var layer v1.Hash
	for d := range blobs {
		layer = d
		break
	}
	get("blob, object store down", b.URL+"/v2/up/team/app/blobs/"+layer.String(), true)
	if strings.HasPrefix(responses["blob, object store down"], "200 ") {
		t.Errorf("a blob served with the object store and the upstream down: %.200s", responses["blob, object store down"])
	}
	for name, r := range responses {
		if strings.Contains(r, s3Canary) {
			t.Errorf("%s: the response holds the S3 secret key: %s", name, r)
		}
	}
	get("metrics after the outage", a.URL+"/metrics", false)
	if strings.Contains(responses["metrics after the outage"], s3Canary) {
		t.Error("metrics hold the S3 secret key")
	}
}

// TestServeS3BadCredentials: a wrong secret key stops serve at startup with
// a message that names the problem and not the key.
func TestServeS3BadCredentials(t *testing.T) {
	t.Parallel()
	c := newS3Cluster(t, nil)
	cfg := filepath.Join(t.TempDir(), "serve.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("listen: 127.0.0.1:%d\n%s", testbin.FreePort(t), c.config())), 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := "wrong-" + s3Canary
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "pullsecret"), "serve", "--config", cfg)
	cmd.Env = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"), "PULLSECRET_HOME=" + c.e.home, s3SecretEnv + "=" + wrong}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("serve with a wrong S3 secret key: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "SignatureDoesNotMatch") || !strings.Contains(string(out), "bucket="+c.s3.Bucket) {
		t.Errorf("the message does not say what is wrong:\n%s", out)
	}
	if strings.Contains(string(out), s3Canary) {
		t.Errorf("the message holds the secret key:\n%s", out)
	}
}

// s3Front is an S3 endpoint in front of the server that can hold the
// upload of one key: the second part of its multipart upload (the first is
// stored) waits until the uploader hangs up.
type s3Front struct {
	srv     *httptest.Server
	mu      sync.Mutex
	hold    string // key substring whose part 2 is held; "" = none
	held    chan struct{}
	started []string // keys whose multipart upload was created
}

func newS3Front(t *testing.T, target string) *s3Front {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	f := &s3Front{held: make(chan struct{})}
	rp := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(u)
		r.Out.Host = r.In.Host // the request is signed for this host
	}}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f.mu.Lock()
		hold := f.hold
		if r.Method == http.MethodPost && q.Has("uploads") {
			f.started = append(f.started, r.URL.Path)
		}
		f.mu.Unlock()
		if hold != "" && r.Method == http.MethodPut && q.Get("partNumber") == "2" && strings.Contains(r.URL.Path, hold) {
			close(f.held)
			// Take the part (it is never stored), so that the server
			// watches the connection and sees the uploader die.
			_, _ = io.Copy(io.Discard, r.Body)
			<-r.Context().Done()
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *s3Front) holdUpload(key string) {
	f.mu.Lock()
	f.hold = key
	f.mu.Unlock()
}

func (f *s3Front) uploadsStarted(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.started {
		if strings.Contains(p, key) {
			n++
		}
	}
	return n
}

// TestServeS3KilledMidFill: SIGKILL of serve while it fills a slowly
// served blob, then while it uploads the verified blob to the bucket.
// Neither leaves an object of the blob in the bucket; a restarted serve
// pulls it afresh, and then the bucket holds exactly the complete,
// verified object.
func TestServeS3KilledMidFill(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const size = 12 << 20 // three parts of the 5 MiB chunk size
	slow := &stallOnce{path: regexp.MustCompile(`/blobs/sha256:`), held: size / 2, stalled: make(chan struct{})}
	c := newS3Cluster(t, slow.wrap)
	front := newS3Front(t, c.s3.Endpoint)
	c.endpoint = front.srv.URL
	d, err := c.up.SeedBlob(ctx, "team/app", size, registry.RandSeed(72))
	if err != nil {
		t.Fatal(err)
	}
	host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
	noObject := func(when string) {
		t.Helper()
		if objs := c.objectsOf(d); len(objs) != 0 {
			t.Fatalf("%s: objects of the blob in the bucket: %q", when, objs)
		}
		if _, err := c.driver().Stat(ctx, "/"+dataKey("blobs", d)); !errors.As(err, new(storagedriver.PathNotFoundError)) {
			t.Fatalf("%s: Stat of the final key: %v, want not found", when, err)
		}
	}

	// 1. Killed mid-fill: half the blob came from the upstream.
	s := c.serve(host)
	var got atomic.Int64
	first := make(chan s3BlobGET, 1)
	go func() { first <- c.getBlob(ctx, s, d, &got) }()
	select {
	case <-slow.stalled:
	case r := <-first:
		t.Fatalf("the pull ended before the upstream stalled: %+v\n%s", r, s.Logs())
	case <-ctx.Done():
		t.Fatal("the upstream never sent the first half")
	}
	for deadline := time.Now().Add(30 * time.Second); got.Load() < size/4; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the client got %d bytes in 30s\n%s", got.Load(), s.Logs())
		}
	}
	s.Kill(t)
	if r := <-first; r.err == nil || r.n >= size {
		t.Fatalf("the interrupted pull ended cleanly: %+v", r)
	}
	noObject("after a kill mid-fill")
	if n := front.uploadsStarted(d.Hex); n != 0 {
		t.Fatalf("%d uploads started before the blob was verified", n)
	}

	// 2. Killed mid-upload: the client has the whole verified blob, the
	// upload to the bucket has stored its first part and waits on the next.
	front.holdUpload(d.Hex)
	s = c.serve(host)
	// The bytes reach the client before the commit starts: verified, the
	// last byte is released, then the upload begins.
	if r := c.getBlob(ctx, s, d, nil); r.status != http.StatusOK || r.err != nil || r.n != size || r.hex != d.Hex {
		t.Fatalf("pull before the upload: %+v\n%s", r, s.Logs())
	}
	select {
	case <-front.held:
	case <-time.After(30 * time.Second):
		t.Fatalf("no upload reached its second part\n%s", s.Logs())
	}
	s.Kill(t)
	if n := front.uploadsStarted(d.Hex); n != 1 {
		t.Fatalf("%d multipart uploads of the blob started, want 1", n)
	}
	noObject("after a kill mid-upload")

	// 3. Restarted: the blob is fetched again and committed, whole.
	front.holdUpload("")
	c.up.ResetRequests()
	s = c.serve(host)
	if r := c.getBlob(ctx, s, d, nil); r.status != http.StatusOK || r.err != nil || r.n != size || r.hex != d.Hex {
		t.Fatalf("pull after the restarts: %+v\n%s", r, s.Logs())
	}
	if n := c.up.BlobFetches(d.String()); n != 1 {
		t.Fatalf("after the restarts the upstream sent the blob %d times, want 1", n)
	}
	c.waitObject("blobs", d)
	c.checkObject("blobs", d, size)
	// The dead processes' spools are gone; the live one's fill is
	// removed once committed.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var fills []string
		_ = filepath.WalkDir(c.spool, func(p string, de fs.DirEntry, err error) error {
			if err == nil && !de.IsDir() && strings.HasPrefix(de.Name(), "fill-") {
				fills = append(fills, p)
			}
			return nil
		})
		if len(fills) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spool files left: %q", fills)
		}
	}
}

// openCacheStore opens each driver by the same configuration form: the
// filesystem under parameters.rootdirectory, inmemory with its spool in
// spool_dir; a fill commits and reads back on each.
func TestOpenCacheStoreDrivers(t *testing.T) {
	t.Parallel()
	home := t.TempDir()
	root := filepath.Join(t.TempDir(), "fs-cache")
	spool := filepath.Join(t.TempDir(), "spool")
	for _, tc := range []struct {
		yaml  string
		check func(t *testing.T)
	}{
		{"cache: {driver: filesystem, parameters: {rootdirectory: " + root + "}}", func(t *testing.T) {
			if st, err := os.Stat(filepath.Join(root, "blobs")); err != nil || !st.IsDir() {
				t.Fatalf("no blobs under rootdirectory: %v", err)
			}
			if st, err := os.Stat(root); err != nil || st.Mode().Perm() != 0o700 {
				t.Fatalf("root mode: %v %v", st.Mode(), err)
			}
		}},
		{"cache: {driver: inmemory, spool_dir: " + spool + "}", func(t *testing.T) {
			if _, err := os.Stat(spool); err != nil {
				t.Fatalf("spool_dir not used: %v", err)
			}
		}},
	} {
		cfg, err := proxy.ParseConfig([]byte(tc.yaml))
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		cc, err := openCacheStore(ctx, cfg.Cache, home, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("%s: %v", tc.yaml, err)
		}
		content := []byte("layer of " + tc.yaml)
		d := digest.FromBytes(content)
		r, err := cc.Blob(ctx, d, func(context.Context) (cache.Fetched, error) {
			return cache.Fetched{Body: io.NopCloser(strings.NewReader(string(content))), Size: int64(len(content))}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, r)
		_ = r.Close()
		if err := cc.Close(); err != nil { // waits for the commit
			t.Fatal(err)
		}
		tc.check(t)
		if cfg.Cache.Driver == proxy.CacheDriverFilesystem {
			again, err := openCacheStore(ctx, cfg.Cache, home, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			hit, err := again.Blob(ctx, d, nil)
			if err != nil || hit.Source() != cache.SourceCache {
				t.Fatalf("no hit after reopening: %v", err)
			}
			_ = hit.Close()
			_ = again.Close()
		}
	}
}

// TestCacheStatsAndGCOnS3: `cache stats` and `cache gc` with the server's
// config work on the bucket, as a cron job beside the replicas would run
// them: the blob a replica cached is counted, then collected; the replica
// fetches it afresh afterwards. The S3 secret reaches them only through
// the environment and shows in no output.
func TestCacheStatsAndGCOnS3(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := newS3Cluster(t, nil)
	d, err := c.up.SeedBlob(ctx, "team/app", 3<<20, registry.RandSeed(5))
	if err != nil {
		t.Fatal(err)
	}
	s := c.serve("")
	if r := c.getBlob(ctx, s, d, nil); r.status != http.StatusOK || r.hex != d.Hex {
		t.Fatalf("pull: %+v", r)
	}
	c.waitObject("blobs", d)

	cfgFile := filepath.Join(t.TempDir(), "serve.yaml")
	if err := os.WriteFile(cfgFile, []byte(c.config()), 0o600); err != nil {
		t.Fatal(err)
	}
	cli := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "pullsecret"), args...)
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "PULLSECRET_CONFIG=" + cfgFile}, c.env()...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if strings.Contains(out.String()+errb.String(), s3Canary) {
			t.Errorf("pullsecret %s printed the S3 secret key", strings.Join(args, " "))
		}
		if err != nil {
			t.Fatalf("pullsecret %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		return out.String()
	}
	type stats struct {
		Dir   string           `json:"dir"`
		Blobs map[string]int64 `json:"blobs"`
	}
	var st stats
	if err := json.Unmarshal([]byte(cli("cache", "stats", "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blobs["count"] != 1 || st.Blobs["bytes"] != 3<<20 || !strings.Contains(st.Dir, "bucket="+c.s3.Bucket) {
		t.Fatalf("stats of the bucket: %+v", st)
	}
	if out := cli("cache", "gc", "--older-than", "0s"); !strings.HasPrefix(out, "deleted 1 entry (3.0 MiB)") {
		t.Fatalf("gc: %s", out)
	}
	if objs := c.objectsOf(d); slices.Contains(objs, dataKey("blobs", d)) {
		t.Fatalf("the blob's object is still in the bucket after gc: %v", objs)
	}
	if err := json.Unmarshal([]byte(cli("cache", "stats", "-o", "json")), &st); err != nil || st.Blobs["count"] != 0 {
		t.Fatalf("stats after gc: %+v %v", st, err)
	}
	// The replica notices nothing but a miss: it fetches the blob again.
	if r := c.getBlob(ctx, s, d, nil); r.status != http.StatusOK || r.hex != d.Hex {
		t.Fatalf("pull after gc: %+v", r)
	}
	if n := c.up.BlobFetches(d.String()); n != 2 {
		t.Errorf("upstream fetches: %d, want 2 (before and after gc)", n)
	}
}
