package cache

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestAccessRecords(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a := AccessKey{"acme", "Registry.Example.com:5000", "team/app"}
	aNorm := AccessKey{"acme", "registry.example.com:5000", "team/app"}
	b := AccessKey{"beta", "registry.example.com:5000", "team/app"}
	const ttl = 10 * time.Minute

	type op struct {
		do      string // record, revoke, advance, valid, invalid
		k       AccessKey
		advance time.Duration
		at      time.Duration // record at now+at
	}
	tests := []struct {
		name string
		ops  []op
	}{
		{"recorded is valid for its project only", []op{
			{do: "record", k: a}, {do: "valid", k: a}, {do: "valid", k: aNorm}, {do: "invalid", k: b},
		}},
		{"expires after the ttl", []op{
			{do: "record", k: a}, {do: "advance", advance: ttl - time.Second}, {do: "valid", k: a},
			{do: "advance", advance: 2 * time.Second}, {do: "invalid", k: a},
		}},
		{"revoked at once", []op{
			{do: "record", k: a}, {do: "revoke", k: aNorm}, {do: "invalid", k: a},
		}},
		{"only moves forward", []op{
			{do: "record", k: a}, {do: "record", k: a, at: -time.Hour}, {do: "advance", advance: ttl / 2}, {do: "valid", k: a},
		}},
		{"renewed", []op{
			{do: "record", k: a}, {do: "advance", advance: ttl - time.Second}, {do: "record", k: a},
			{do: "advance", advance: ttl - time.Second}, {do: "valid", k: a},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			var recs AccessRecords = NewAccessRecords(AccessClock(clk.Now))
			for i, o := range tt.ops {
				switch o.do {
				case "record":
					if err := recs.Record(ctx, o.k, clk.Now().Add(o.at)); err != nil {
						t.Fatal(err)
					}
				case "revoke":
					if err := recs.Revoke(ctx, o.k); err != nil {
						t.Fatal(err)
					}
				case "advance":
					clk.Advance(o.advance)
				case "valid", "invalid":
					ok, err := recs.Valid(ctx, o.k, ttl)
					if err != nil || ok != (o.do == "valid") {
						t.Fatalf("op %d: Valid(%v) = %v, %v", i, o.k, ok, err)
					}
				}
			}
		})
	}
	if err := NewAccessRecords().Record(ctx, AccessKey{"", "h", "r"}, time.Now()); !errors.Is(err, ErrInvalidName) {
		t.Errorf("record without project: %v", err)
	}
}

func TestAccessRecordsFile(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "access.json")
	clk := newFakeClock()
	a := AccessKey{"acme", "ghcr.io", "acme/app"}
	b := AccessKey{"beta", "ghcr.io", "beta/app"}

	recs, err := OpenAccessRecords(path, AccessClock(clk.Now), AccessFlushDelay(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := recs.Record(ctx, a, clk.Now()); err != nil {
		t.Fatal(err)
	}
	if err := recs.Record(ctx, b, clk.Now()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "write-behind", func() bool {
		data, _ := os.ReadFile(path)
		return strings.Contains(string(data), "beta/app")
	})
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v %v", fi.Mode(), err)
	}
	// A revocation is on disk when Revoke returns (no Close: a crash).
	if err := recs.Revoke(ctx, b); err != nil {
		t.Fatal(err)
	}
	again, err := OpenAccessRecords(path, AccessClock(clk.Now))
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := again.Valid(ctx, a, time.Minute); !ok {
		t.Error("record lost across reopen")
	}
	if ok, _ := again.Valid(ctx, b, time.Minute); ok {
		t.Error("revoked record came back after reopen")
	}
	_ = recs.Close()
	_ = again.Close()
	// No temporary files left behind.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("files in the folder: %v", ents)
	}

	// Old records are dropped at load; a corrupt file is ignored.
	clk.Advance(DefaultAccessRetention + time.Hour)
	old, err := OpenAccessRecords(path, AccessClock(clk.Now))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := old.Last(ctx, a); ok {
		t.Error("record past retention loaded")
	}
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad, err := OpenAccessRecords(path, AccessClock(clk.Now))
	if err != nil {
		t.Fatalf("corrupt file: %v", err)
	}
	if _, ok, _ := bad.Last(ctx, a); ok {
		t.Error("record from a corrupt file")
	}
}
