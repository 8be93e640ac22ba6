package replicas

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/s3test"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

const canary = "canary-replicas-pw-5d0c"

func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs PostgreSQL, versitygw and two pullsecret serve processes")
	}
	pgtest.Require(t)
	s3test.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": canary}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	const size = 4 << 20
	blob, err := up.SeedBlob(ctx, "team/app", size, registry.RandSeed(7))
	if err != nil {
		t.Fatal(err)
	}

	bin := testbin.Build(t, "pullsecret")
	c, err := Start(ctx, Options{Bin: bin, N: 2, Upstreams: map[string]string{"up": up.Host()}, AllowPrivate: []string{"127.0.0.1/32"}})
	if err != nil {
		t.Fatal(err)
	}
	dir := c.Dir
	defer func() {
		s3Secret := c.s3.SecretKey
		if t.Failed() {
			for _, l := range c.Logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
		}
		for _, l := range c.Logs {
			b, _ := os.ReadFile(l)
			if strings.Contains(string(b), canary) || strings.Contains(string(b), s3Secret) {
				t.Errorf("%s holds a credential", l)
			}
		}
		if err := c.Close(); err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("work folder %s after Close: %v", dir, err)
		}
	}()
	if len(c.URLs) != 2 || c.Front == "" || strings.Contains(c.Database, ":"+c.pg.Password) {
		t.Fatalf("cluster: URLs %q, front %q, database %q", c.URLs, c.Front, c.Database)
	}

	if _, err := c.CLI(ctx, canary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme"); err != nil {
		t.Fatal(err)
	}
	out, err := c.CLI(ctx, "", "token", "create", "--project", "acme", "--scope", "pull")
	if err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(out)

	path := "/v2/up/team/app/blobs/" + blob.String()
	basic := func(r *http.Request) { r.SetBasicAuth("ci", tok) }
	for _, base := range append([]string{c.Front, c.Front}, c.URLs...) {
		if err := pull(ctx, base+path, basic, blob.String(), size); err != nil {
			t.Error(err)
		}
	}

	// A registry token from the front's /token, used for two more GETs
	// through the front: the round robin sends them to different replicas
	// from the one that signed it.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.Front+"/token?service=pullsecret&scope=repository:up/team/app:pull", nil)
	basic(req)
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
		t.Fatalf("token through the front: %s %v", resp.Status, err)
	}
	for range 2 {
		if err := pull(ctx, c.Front+path, func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+tr.Token) }, blob.String(), size); err != nil {
			t.Error(err)
		}
	}
	if n := up.BlobFetches(blob.String()); n != 1 {
		t.Errorf("the upstream sent the blob %d times, want 1", n)
	}

	// crane through the front, as a user of `make replicas` would: its
	// token request, manifest and blob requests spread over the replicas.
	clients.Require(t, "crane")
	img, err := up.SeedRandom(ctx, "team/img", "v1", registry.Layers(3), registry.LayerSize(1<<20), registry.RandSeed(8))
	if err != nil {
		t.Fatal(err)
	}
	cenv := clients.NewEnv(t)
	front := strings.TrimPrefix(c.Front, "http://")
	cenv.Login(front, "ci", tok)
	layout := t.TempDir()
	if r, err := cenv.Crane(ctx, "pull", "--insecure", "--format", "oci", front+"/up/team/img:v1", layout); err != nil || r.ExitCode != 0 {
		t.Fatalf("crane pull through the front: %v\n%s", err, r.Output())
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		if _, err := os.Stat(filepath.Join(layout, "blobs", d.Algorithm, d.Hex)); err != nil {
			t.Errorf("layer %s not in crane's layout: %v", d, err)
		}
	}
	for _, l := range c.Logs {
		if b, _ := os.ReadFile(l); !strings.Contains(string(b), "team/img") {
			t.Errorf("%s served none of crane's requests: the front did not spread them", l)
		}
	}

	// A killed replica is gone; the other still serves.
	if err := c.Kill(0); err != nil {
		t.Fatal(err)
	}
	if err := pull(ctx, c.URLs[1]+path, basic, blob.String(), size); err != nil {
		t.Error(err)
	}
}

func pull(ctx context.Context, url string, auth func(*http.Request), digest string, size int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	auth(req)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); resp.StatusCode != http.StatusOK || n != size || got != digest {
		return fmt.Errorf("GET %s: %s, %d bytes, %s", url, resp.Status, n, got)
	}
	return nil
}
