package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

func TestCacheStatsAndGC(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	// No cache yet: stats are zero, gc has nothing to do.
	if out := e.must("", "cache", "stats"); !strings.Contains(out, "total           0  0 B") {
		t.Fatalf("empty stats:\n%s", out)
	}
	e.must("", "cache", "gc", "--max-size", "1GiB")

	// Two blobs of 1 KiB and 2 KiB, filled as the proxy would.
	ctx := context.Background()
	cc, err := cache.OpenFilesystem(ctx, filepath.Join(e.home, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range []int{1024, 2048} {
		putBlob(t, cc, bytes.Repeat([]byte{byte(i + 1)}, n))
		time.Sleep(10 * time.Millisecond) // distinct commit times: the first is the LRU one
	}
	if err := cc.Close(); err != nil { // waits for the commits
		t.Fatal(err)
	}

	var stats struct {
		Total struct{ Count, Bytes int64 }
		Blobs struct{ Count, Bytes int64 }
	}
	if err := json.Unmarshal([]byte(e.must("", "cache", "stats", "-o", "json")), &stats); err != nil {
		t.Fatal(err)
	}
	if stats.Blobs.Count != 2 || stats.Blobs.Bytes != 3072 {
		t.Fatalf("stats %+v", stats)
	}

	// Keep at most 2 KiB: the least recently used (1 KiB) goes.
	out := e.must("", "cache", "gc", "--max-size", "2KiB")
	if !strings.Contains(out, "deleted 1 entry (1.0 KiB), kept 1 (2.0 KiB)") {
		t.Fatalf("gc: %s", out)
	}
	var res struct{ Deleted, Kept int }
	if err := json.Unmarshal([]byte(e.must("", "cache", "gc", "--older-than", "0s", "-o", "json")), &res); err != nil {
		t.Fatal(err)
	}
	if res.Deleted != 1 || res.Kept != 0 {
		t.Fatalf("gc --older-than 0s: %+v", res)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"cache", "gc"}, "give --max-size, --older-than or both"},
		{[]string{"cache", "gc", "--max-size", "12XB"}, "--max-size: invalid size"},
		{[]string{"cache", "gc", "--older-than", "soon"}, "--older-than: invalid duration"},
		{[]string{"cache", "stats", "extra"}, "unexpected argument"},
	} {
		r := e.run("", tc.args...)
		if r.code != exitUsage || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want usage error %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}

// putBlob fills content into cc as the proxy would.
func putBlob(t *testing.T, cc *cache.Cache, content []byte) {
	t.Helper()
	r, err := cc.Blob(context.Background(), digest.FromBytes(content), func(context.Context) (cache.Fetched, error) {
		return cache.Fetched{Body: io.NopCloser(bytes.NewReader(content)), Size: int64(len(content))}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, r)
	_ = r.Close()
}

// TestCacheStatsConfig: with the server's config the commands find the
// cache where serve keeps it (cache.root); an explicit --dir wins over
// $PULLSECRET_CONFIG, and --dir with --config is a usage error.
func TestCacheStatsConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	root := filepath.Join(t.TempDir(), "elsewhere")
	cc, err := cache.OpenFilesystem(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	putBlob(t, cc, bytes.Repeat([]byte("a"), 1024))
	cc.Close()
	cfgFile := filepath.Join(t.TempDir(), "serve.yaml")
	os.WriteFile(cfgFile, []byte("cache: {root: "+root+"}\n"), 0o600)

	if out := e.must("", "cache", "stats", "--config", cfgFile); !strings.Contains(out, root) || !strings.Contains(out, "blobs           1  1.0 KiB") {
		t.Fatalf("stats --config:\n%s", out)
	}
	e.vars["PULLSECRET_CONFIG"] = cfgFile
	if out := e.must("", "cache", "stats"); !strings.Contains(out, root) {
		t.Fatalf("stats with $PULLSECRET_CONFIG:\n%s", out)
	}
	other := t.TempDir()
	if out := e.must("", "cache", "stats", "--dir", other); !strings.Contains(out, other) {
		t.Fatalf("--dir with $PULLSECRET_CONFIG:\n%s", out)
	}
	if r := e.run("", "cache", "gc", "--older-than", "1h", "--dir", other, "--config", cfgFile); r.code != exitUsage || !strings.Contains(r.stderr, "not both") {
		t.Fatalf("--dir and --config: exit %d %q", r.code, r.stderr)
	}
}

func TestParseSizeAndAge(t *testing.T) {
	t.Parallel()
	sizes := map[string]int64{"0": 0, "1024": 1024, "1KiB": 1024, "1k": 1024, "1KB": 1000, "1.5GiB": 3 << 29, "20GB": 20e9, "2 MiB": 2 << 20}
	for in, want := range sizes {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "1XB", "GiB", "1e400"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
	if d, err := parseAge("30d"); err != nil || d != 720*time.Hour {
		t.Errorf("parseAge(30d) = %v, %v", d, err)
	}
	if d, err := parseAge("90m"); err != nil || d != 90*time.Minute {
		t.Errorf("parseAge(90m) = %v, %v", d, err)
	}
	for _, bad := range []string{"", "-1h", "xd", "1y"} {
		if _, err := parseAge(bad); err == nil {
			t.Errorf("parseAge(%q) accepted", bad)
		}
	}
}
