package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/pullsecret/pullsecret/internal/replicas"
	"github.com/pullsecret/pullsecret/registry"
)

// Sizes and counts of the replicas benchmark.
const (
	replicasBlobSize   = 64 << 20
	replicasClients    = 30
	replicasWarmRounds = 5
	replicasRepo       = "bench/replicas"
	// replicasClientBuf is each client's read buffer (see cacheClientBuf).
	replicasClientBuf = 256 << 10
)

// replicasBench compares, in one run, a cluster of three `pullsecret serve`
// replicas with a cluster of one, each built by internal/replicas as an
// operator builds it (PostgreSQL metadata, one versitygw bucket for the
// cache, a cluster section), in front of one in-process upstream
// (distribution v3, filesystem driver, htpasswd) whose blob bytes are
// counted:
//
//   - cold: 30 concurrent clients, spread round-robin over the replicas,
//     pull a blob no replica has: the bytes the upstream sends (target: the
//     blob once, whatever the number of replicas) and the wall time;
//   - warm: then, once the blob is in the bucket, 30 concurrent clients pull
//     it again, served from the cache: the aggregate throughput.
//
// The clients go to the replicas' own addresses, not through the
// round-robin front, so that the front's copy is not measured.
//
// The clusters run one after the other, each with a fresh database and
// bucket. On one machine the three replicas, versitygw, PostgreSQL, the
// upstream and the clients all share the same cores, so the 3-vs-1 ratio
// measures what the cluster costs (peer streaming, leases, more processes),
// not how it scales out across machines.
func (b *bench) replicasBench(ctx context.Context) error {
	tmp, err := os.MkdirTemp("", "pullsecret-bench-replicas-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	counter := &upstreamCounter{}
	const user, pass = "bench", "bench-upstream-pw"
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{user: pass}),
		registry.WithFilesystem(filepath.Join(tmp, "upstream")),
		registry.WithHandlerWrapper(counter.wrap))
	if err != nil {
		return fmt.Errorf("start the upstream: %w", err)
	}
	defer up.Close()
	blob, err := up.SeedBlob(ctx, replicasRepo, replicasBlobSize, registry.RandSeed(5))
	if err != nil {
		return fmt.Errorf("seed blob: %w", err)
	}

	rb := &replicasRun{bench: b, up: up, counter: counter, blob: blob, user: user, pass: pass,
		client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: replicasClients, DisableCompression: true}},
	}
	rb.bufs = make([][]byte, replicasClients)
	for i := range rb.bufs {
		rb.bufs[i] = make([]byte, replicasClientBuf)
	}
	load0 := loadAvg()
	res := map[int]*replicasResult{}
	for _, n := range []int{1, 3} {
		r, err := rb.run(ctx, n)
		if err != nil {
			return fmt.Errorf("%d replicas: %w", n, err)
		}
		res[n] = r
	}
	load1 := loadAvg()

	fmt.Printf("upstream: distribution v3 in-process (filesystem driver, htpasswd); replicas: `pullsecret serve` processes (internal/replicas: PostgreSQL metadata, versitygw bucket, cluster section); clients straight to the replicas, round-robin\n")
	fmt.Printf("blob: %d MiB random; %d concurrent clients; cold: 1 round per cluster (clients verify sha256); warm: %d rounds, median (min, max)\n",
		replicasBlobSize>>20, replicasClients, replicasWarmRounds)
	fmt.Printf("NumCPU %d: clients, upstream, replicas, versitygw and PostgreSQL share them; load average before %s, after %s\n", runtime.NumCPU(), load0, load1)
	for _, n := range []int{1, 3} {
		r := res[n]
		fmt.Printf("%d replica(s): cold wall %6.2f s  upstream sent %5.2fx the blob   warm aggregate %7.0f MiB/s (min %5.0f, max %5.0f)\n",
			n, r.coldWall, r.upstream, median(r.warm), slices.Min(r.warm), slices.Max(r.warm))
	}
	fmt.Println("--")
	ratio := median(res[3].warm) / median(res[1].warm)
	figure("3 replicas / 1 replica warm aggregate throughput", fmt.Sprintf("%.2fx", ratio), "info", true)
	ratio = res[3].coldWall / res[1].coldWall
	figure(fmt.Sprintf("3 replicas / 1 replica cold wall time, %d clients", replicasClients), fmt.Sprintf("%.2fx", ratio), "info", true)
	for _, name := range []string{"1 replica", "3 replicas"} {
		u := res[int(name[0]-'0')].upstream
		figure(fmt.Sprintf("upstream bytes, %d cold clients, %s", replicasClients, name), fmt.Sprintf("%.2fx blob", u), "= 1x blob", u == 1)
	}
	return nil
}

// replicasRun is what both clusters share: the upstream, its counter, the
// blob and the clients.
type replicasRun struct {
	bench      *bench
	up         *registry.Registry
	counter    *upstreamCounter
	blob       v1.Hash
	user, pass string
	client     *http.Client
	bufs       [][]byte // one read buffer per client
}

// replicasResult is one cluster's figures: cold wall time (s), the bytes the
// upstream sent for the cold round over the blob size, and the warm
// aggregate throughput of each round (MiB/s).
type replicasResult struct {
	coldWall float64
	upstream float64
	warm     []float64
}

func (rb *replicasRun) run(ctx context.Context, n int) (_ *replicasResult, err error) {
	c, err := replicas.Start(ctx, replicas.Options{
		Bin:          rb.bench.bin,
		N:            n,
		Upstreams:    map[string]string{"up": rb.up.Host()},
		AllowPrivate: []string{"127.0.0.1/32"},
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			for _, l := range c.Logs {
				fmt.Fprintf(os.Stderr, "--- %s (end)\n%s\n", l, tailFile(l, 2<<10))
			}
		}
		if cerr := c.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if _, err := c.CLI(ctx, rb.pass+"\n", "secret", "create", "upstream", "--registry", rb.up.Host(),
		"--username", rb.user, "--password-stdin", "--project", "bench"); err != nil {
		return nil, err
	}
	out, err := c.CLI(ctx, "", "token", "create", "--project", "bench", "--scope", "pull")
	if err != nil {
		return nil, err
	}
	tok := strings.TrimSpace(out)
	path := "/v2/up/" + replicasRepo + "/blobs/" + rb.blob.String()
	urls := make([]string, replicasClients)
	for i := range urls {
		urls[i] = c.URLs[i%n] + path
	}
	r := &replicasResult{}

	before := rb.counter.blobBytes.Load()
	if r.coldWall, err = rb.round(ctx, urls, tok, true); err != nil {
		return nil, fmt.Errorf("cold: %w", err)
	}
	r.upstream = float64(rb.counter.blobBytes.Load()-before) / replicasBlobSize

	// Warm means in the bucket: wait for the fill's upload, then one pull
	// per replica (connections, the page cache of the object's file).
	if err := waitObject(ctx, c.BucketDir, rb.blob); err != nil {
		return nil, err
	}
	for _, u := range c.URLs {
		if _, err := rb.round(ctx, []string{u + path}, tok, false); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
	}
	for range replicasWarmRounds {
		wall, err := rb.round(ctx, urls, tok, false)
		if err != nil {
			return nil, fmt.Errorf("warm: %w", err)
		}
		r.warm = append(r.warm, float64(len(urls))*float64(replicasBlobSize>>20)/wall)
	}
	return r, nil
}

// round GETs every URL at once with the project token and returns the wall
// time until the last byte of the last client, in seconds.
func (rb *replicasRun) round(ctx context.Context, urls []string, tok string, verify bool) (float64, error) {
	errs := make([]error, len(urls))
	var wg sync.WaitGroup
	start := time.Now()
	for i, u := range urls {
		wg.Go(func() { errs[i] = rb.get(ctx, u, tok, verify, rb.bufs[i]) })
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	return wall, errors.Join(errs...)
}

func (rb *replicasRun) get(ctx context.Context, url, tok string, verify bool, buf []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.SetBasicAuth("ci", tok)
	resp, err := rb.client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(msg)))
	}
	var w io.Writer = io.Discard
	h := sha256.New()
	if verify {
		w = h
	}
	// The wrappers keep io.Copy from using Discard's small-buffer ReadFrom.
	n, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{resp.Body}, buf)
	if err != nil {
		return fmt.Errorf("GET %s: after %d bytes: %w", url, n, err)
	}
	if n != replicasBlobSize {
		return fmt.Errorf("GET %s: %d bytes, want %d", url, n, replicasBlobSize)
	}
	if verify {
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != rb.blob.String() {
			return fmt.Errorf("GET %s: digest %s, want %s", url, got, rb.blob)
		}
	}
	return nil
}

// waitObject waits until the blob's object is complete in the bucket's
// folder (the cache's layout: blobs/<alg>/<hex[:2]>/<hex>/data). S3 shows
// an object only once its upload completes, and so does versitygw's folder.
func waitObject(ctx context.Context, bucketDir string, d v1.Hash) error {
	p := filepath.Join(bucketDir, "blobs", d.Algorithm, d.Hex[:2], d.Hex, "data")
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		if fi, err := os.Stat(p); err == nil && fi.Size() == replicasBlobSize {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the blob is not in the bucket (%s): %w", p, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// loadAvg is the 1, 5 and 15 minute load averages, as /proc/loadavg has
// them ("?" where there is none).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// tailFile is the end of a file, for an error report.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
