package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRenderBar(t *testing.T) {
	t.Parallel()
	const label = "sha256:0123456789ab"
	for _, tc := range []struct {
		done, total int64
		width       int
		want        string
	}{
		{0, 1024, 60, "sha256:0123456789ab  [              ]         0 B / 1.0 KiB"},
		{512, 1024, 60, "sha256:0123456789ab  [======>       ]       512 B / 1.0 KiB"},
		{1024, 1024, 60, "sha256:0123456789ab  [==============]     1.0 KiB / 1.0 KiB"},
		// More than announced: the bar stays full.
		{4096, 1024, 60, "sha256:0123456789ab  [==============]     4.0 KiB / 1.0 KiB"},
		// 33 columns of bar, 3/10 of them done: 9.
		{3 << 20, 10 << 20, 80, "sha256:0123456789ab  [========>                        ]     3.0 MiB / 10.0 MiB"},
		// Too narrow for a bar: the counts alone, cut short of the last column.
		{512, 1024, 40, "sha256:0123456789ab       512 B / 1.0 K"},
		// Size unknown: no bar, no total.
		{512, 0, 60, "sha256:0123456789ab       512 B"},
	} {
		got := renderBar(label, tc.done, tc.total, tc.width)
		if got != tc.want {
			t.Errorf("renderBar(%d, %d, width %d) =\n%q\nwant\n%q", tc.done, tc.total, tc.width, got, tc.want)
		}
		if len(got) > tc.width-1 {
			t.Errorf("renderBar(%d, %d, width %d) is %d wide", tc.done, tc.total, tc.width, len(got))
		}
	}
}

// TestProgressFrames drives the display frame by frame and checks every
// byte written to the (fake) terminal.
func TestProgressFrames(t *testing.T) {
	t.Parallel()
	const (
		width = 60
		a     = "sha256:aaaaaaaaaaaa"
		b     = "sha256:bbbbbbbbbbbb"
		c     = "sha256:cccccccccccc"
		clr   = "\r\x1b[2K"
	)
	var term bytes.Buffer
	p := newProgress(&term, width)
	frame := func(want string) {
		t.Helper()
		p.draw()
		if got := term.String(); got != want {
			t.Fatalf("frame\n%q\nwant\n%q", got, want)
		}
		term.Reset()
	}
	ba := p.bar(a, 1024)
	bb := p.bar(b, 2048)
	frame(clr + renderBar(a, 0, 1024, width) + "\n" +
		clr + renderBar(b, 0, 2048, width) + "\n")
	frame("") // nothing changed, nothing drawn

	ba.add(1024)
	bb.add(512)
	frame("\x1b[2A" +
		clr + renderBar(a, 1024, 1024, width) + "\n" +
		clr + renderBar(b, 512, 2048, width) + "\n")

	// A finished bar becomes a permanent line above the live ones, and so
	// does a message.
	ba.end("cached")
	p.line("a log line")
	frame("\x1b[2A" +
		clr + a + "  cached  1.0 KiB\n" +
		clr + "a log line\n" +
		clr + renderBar(b, 512, 2048, width) + "\n")

	// An abandoned bar disappears: its line is cleared and the cursor goes
	// back up over it.
	bc := p.bar(c, 100)
	frame("\x1b[1A" +
		clr + renderBar(b, 512, 2048, width) + "\n" +
		clr + renderBar(c, 0, 100, width) + "\n")
	bc.end("")
	bb.end("already cached")
	frame("\x1b[2A" +
		clr + b + "  already cached  2.0 KiB\n" +
		clr + "\n" +
		"\x1b[1A")

	// finish draws what is left and leaves the screen alone afterwards.
	p.line("done")
	p.finish()
	if got, want := term.String(), clr+"done\n"; got != want {
		t.Fatalf("finish wrote %q, want %q", got, want)
	}
}

// TestProgressTicker: started, the display redraws on its own; finished,
// it stops.
func TestProgressTicker(t *testing.T) {
	t.Parallel()
	var term syncWriter
	p := newProgress(&term, 60)
	p.start()
	b := p.bar("sha256:0123456789ab", 10)
	b.add(5)
	b.end("cached")
	p.finish()
	if got := term.String(); !strings.HasSuffix(got, "sha256:0123456789ab  cached  10 B\n") {
		t.Fatalf("terminal shows %q", got)
	}
}

func TestTermWidthAndTerminal(t *testing.T) {
	t.Parallel()
	for cols, want := range map[string]int{"120": 120, "": 80, "wide": 80, "5": 80, " 100 ": 100} {
		if got := termWidth(func(string) string { return cols }); got != want {
			t.Errorf("COLUMNS=%q: width %d, want %d", cols, got, want)
		}
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for name, w := range map[string]io.Writer{"buffer": &bytes.Buffer{}, "file": f, "null device": null} {
		if isTerminal(w) {
			t.Errorf("%s taken for a terminal", name)
		}
	}
}
